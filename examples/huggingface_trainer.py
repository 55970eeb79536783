"""MetaOptimize in Hugging Face's Trainer: a tiny random GPT-2 on random tokens, CPU, no network.

    python examples/huggingface_trainer.py --max-steps 200 --output-dir runs/examples/hf
    python examples/huggingface_trainer.py --report-to tensorboard   # then: tensorboard --logdir runs/examples/hf

The learned step size lands in every training log as `step_size` (trainer_state.json, the console, and
TensorBoard / W&B as `train/step_size` with --report-to). `--lr-scheduler-type linear`, Trainer's default, shows
what the warning is about: the schedule takes the `lr` multiplier, and with it the step size, to 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from metaopt import MetaOptimize
from metaopt.integrations.huggingface import log_step_sizes


class RandomTokens(torch.utils.data.Dataset):
    """Sequences of random tokens with a repeated second half, so that there is something to learn."""

    def __init__(self, size: int, length: int, vocab_size: int, seed: int = 0) -> None:
        half = torch.randint(vocab_size, (size, length // 2), generator=torch.Generator().manual_seed(seed))
        self.tokens = torch.cat([half, half], dim=1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class RecordStepSizes(TrainerCallback):
    """Records optimizer.step_sizes() after every optimizer step, read from the optimizer itself: what the logs
    must hold (the tests compare them)."""

    def __init__(self, optimizer: MetaOptimize) -> None:
        self.optimizer, self.by_step = optimizer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = self.optimizer.step_sizes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--output-dir", default="runs/examples/huggingface")
    parser.add_argument("--lr-scheduler-type", default="constant", help="constant (right for MetaOptimize); linear "
                        "is Trainer's default, which decays the learned step size to 0")
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = MetaOptimize(model.named_parameters(), base="adamw", meta="lion", alpha0=1e-3, meta_lr=1e-2)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        logging_steps=args.logging_steps,
        lr_scheduler_type=args.lr_scheduler_type,  # "constant": the lr multiplier stays 1
        report_to=args.report_to,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    record = RecordStepSizes(optimizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(512, 32, config.vocab_size),
                      optimizers=(optimizer, None), callbacks=[record])
    log_step_sizes(trainer)  # ahead of the reporting callbacks, so TensorBoard / W&B get the step sizes too
    trainer.train()

    out = Path(args.output_dir)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    (out / "step_sizes_by_step.json").write_text(json.dumps(record.by_step, indent=1))
    last = [entry for entry in trainer.state.log_history if "step_size" in entry][-1]
    print(f"step {last['step']}: loss {last['loss']:.3f}, step_size {last['step_size']:.3g}, "
          f"learning_rate (the multiplier) {last['learning_rate']:.3g}")


if __name__ == "__main__":
    main()
