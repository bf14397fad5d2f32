"""Run a stage's command line and SIGKILL this process at its n-th training-state save into one
stage's directory: right after the save ("after"), or halfway through writing it, before the
rename ("during"). The cut that tests/test_resume.py resumes from.

    python tests/cut_run.py after|during|interrupt|never N STAGE_DIR MODULE [flags...]

"interrupt" sends this process SIGINT (Ctrl-C) after the save instead. The environment variable
CUT_SFT, a JSON object, overrides sft.SFTConfig's defaults: the SFT model dpo.py builds when it is
missing is then a tiny one.
"""

import functools
import importlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resume  # noqa: E402


def main():
    when, n, stage_dir, module, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    real_save, real_write, saves = resume.save, resume.write_atomically, []

    def save(path, *args):
        if os.path.basename(os.path.dirname(path)) == stage_dir:
            saves.append(path)
        real_save(path, *args)
        if len(saves) == n and when in ("after", "interrupt"):
            os.kill(os.getpid(), signal.SIGKILL if when == "after" else signal.SIGINT)

    def write_atomically(path, write):
        if len(saves) == n and when == "during":  # the temp file half written, then the kill
            tmp = f"{path}.tmp{os.getpid()}"
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, write)

    resume.save, resume.write_atomically = save, write_atomically
    if os.environ.get("CUT_SFT"):
        import sft
        sft.SFTConfig = functools.partial(sft.SFTConfig, **json.loads(os.environ["CUT_SFT"]))
    importlib.import_module(module).main(flags)


if __name__ == "__main__":
    main()
