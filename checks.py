"""
The stages' flag checks: a value that cannot work stops the run with one line (ConfigError, exit 1)
before any data is built, any model loaded or any step taken, and so does a flag that would change
nothing (a run must not pass for what it is not). sft.py, dpo.py and rlvr.py each call theirs
first; the checks that belong to one feature live beside it (the family's in dpo_family.py, the
on-policy flags' in pairs.py, LoRA's targets in lora.py, a preset's in presets.py, a state's in
resume.py, the batch split's in distributed.py) and are called from here.
"""

import distributed as D
import lora
import plumbing as P
import presets
import resume as R
from dpo_family import check_family_flags, unsplittable
from online import check_on_policy_flags
from pairs import row_layout


def sft(config, known_stages):
    """sft.py's flags. -> the stages to run, in the order given"""
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    P.require(set(stages) <= set(known_stages), f"--stages {config.stages!r}: name some of "
              f"{', '.join(known_stages)}, comma-separated")
    P.check_flags(config, positive=("n_layer", "n_head", "n_embd", "block_size", "pretrain_batch_size",
                                    "pretrain_seq_len", "pretrain_lr", "sft_batch_size", "sft_lr", "max_new_tokens",
                                    "eval_every", "log_every", "grad_clip", "cot_steps", "cot_lr", "pft_batch_size",
                                    "pft_lr"),
                  non_negative=("warmup_steps", "weight_decay", "eval_problems", "pft_steps", "pft_max_pairs"))
    P.require(config.pretrain_steps > 0 or "pretrain" not in stages, f"--pretrain-steps must be > 0, got "
              f"{config.pretrain_steps} (leave the stage out with --stages sft)")
    P.require(config.sft_steps > 0 or "sft" not in stages, f"--sft-steps must be > 0, got {config.sft_steps} "
              f"(leave the stage out with --stages pretrain)")
    presets.check(config)
    P.check_out(config.out)
    D.check_split({flag: size for stage, flag, size in (
        ("pretrain", "--pretrain-batch-size", config.pretrain_batch_size), ("sft", "--sft-batch-size", config.sft_batch_size),
        ("cot", "--sft-batch-size", config.sft_batch_size), ("preferred-ft", "--pft-batch-size", config.pft_batch_size))
        if stage in stages}, config.grad_accum)
    P.require(not config.init or {"cot", "preferred-ft"} & set(stages), "--init: only the cot and preferred-ft "
              "stages start from a checkpoint")
    P.require_file(config.init)
    P.require(config.n_embd % config.n_head == 0, f"--n-embd {config.n_embd} must be a multiple of --n-head "
              f"{config.n_head} (each head gets n_embd / n_head dimensions)")
    P.require(config.n_embd // config.n_head % 2 == 0, f"--n-embd {config.n_embd} / --n-head {config.n_head} "
              f"gives heads of {config.n_embd // config.n_head} dimensions; RoPE rotates them in pairs: make it even")
    P.require(config.pretrain_seq_len <= config.block_size or "pretrain" not in stages, f"--pretrain-seq-len "
              f"{config.pretrain_seq_len} is longer than the model's context, --block-size {config.block_size}")
    return stages


def dpo(config, builds):
    """dpo.py's flags (builds: the stages dpo.py runs first when the SFT model is missing, whose cut
    state --resume may continue)."""
    check_family_flags(config)
    P.check_flags(config, positive=("beta", "lr", "batch_size", "max_length", "max_prompt_len", "max_new_tokens",
                                    "log_every", "eval_every_problems", "grad_clip"),
                  non_negative=("epochs", "steps", "max_pairs", "eval_problems", "eval_every", "warmup_steps",
                                "rpo_alpha", "eval_temperature"))
    P.require(config.lr_schedule in P.LR_SCHEDULES, f"--lr-schedule {config.lr_schedule!r} is unknown; known: "
              f"{', '.join(P.LR_SCHEDULES)}")
    P.require(config.steps or config.epochs, "--epochs 0 with --steps 0 leaves nothing to train")
    P.require(config.lora_rank >= 0, f"--lora-rank must be >= 0 (0: full fine-tuning), got {config.lora_rank}")
    lora.lora_suffixes(config.lora_targets)  # checked without --lora-rank too: a typo should not wait for it
    P.require(0 <= config.label_noise <= 1, f"--label-noise is a share of the pairs, in [0, 1], got "
              f"{config.label_noise}")
    check_on_policy_flags(config, type(config))
    P.require(config.packing or row_layout(config)["shared"], "--no-packing does nothing "
              "with --no-prefix-sharing or --loss-type kto: only a row per pair packs")
    presets.check(config)
    P.check_out(config.out)
    R.require_state(config, ["dpo"], "python dpo.py", builds)  # a cut earlier stage counts
    D.check_split({"--batch-size": config.batch_size}, config.grad_accum, unsplittable(config))


def rlvr(config, builds):
    """rlvr.py's flags (builds: the stages rlvr.py runs first when the DPO model is missing)."""
    P.require(config.aggregation in ("token", "sequence"), f"--aggregation {config.aggregation!r} is unknown; "
              f"known: token, sequence")
    P.check_flags(config, positive=("prompts_per_step", "temperature", "max_new_tokens", "lr", "eval_samples",
                                    "inner_steps", "log_every", "std_floor", "grad_clip"),
                  non_negative=("steps", "max_seconds", "warmup_steps", "micro_batch", "eval_problems", "kl_coef",
                                "clip_eps", "clip_eps_high", "format_reward"))
    D.check_split({"--prompts-per-step": config.prompts_per_step}, 1)
    P.require(not config.max_seconds or D.world_size() == 1, "--max-seconds: each process would stop at its own "
              "time; on several processes give --steps")
    P.require(config.group_size >= 2, f"--group-size must be >= 2 (an advantage compares a reply with the others "
              f"to the same prompt), got {config.group_size}")
    P.require(config.clip_eps < 1, f"--clip-eps must be below 1 (the ratio's lower clip is 1 - eps), "
              f"got {config.clip_eps}")
    P.require(config.scale_rewards or config.std_floor == type(config).std_floor, "--std-floor does nothing with "
              "--no-scale-rewards: the advantages are not divided by the std")
    for name in ("eval_reference", "eval_problems_file"):
        P.require(config.eval_problems or not getattr(config, name), f"--{name.replace('_', '-')} does nothing "
                  f"with --eval-problems 0 (no evaluation)")
    presets.check(config)
    P.check_out(config.out)
    R.require_state(config, ["rlvr"], "python rlvr.py", builds)  # a cut earlier stage counts
    P.require(not config.clip_eps_high or config.clip_eps_high >= config.clip_eps, f"--clip-eps-high "
              f"{config.clip_eps_high} is below --clip-eps {config.clip_eps}: clip-higher widens the upper side only")
