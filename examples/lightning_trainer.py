"""MetaOptimize in Lightning: an MLP on scikit-learn's digits, CPU, logged to metrics.csv by CSVLogger.

    python examples/lightning_trainer.py --max-steps 300 --output-dir runs/examples/lightning

StepSizeCallback adds `step_size` to the loggers' rows every --log-every steps. `--scheduler cosine` attaches
a CosineAnnealingLR to MetaOptimize, which the callback warns about: it decays the learned step size to 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits

from metaopt import MetaOptimize
from metaopt.integrations.lightning import StepSizeCallback


class DigitsClassifier(lightning.LightningModule):
    def __init__(self, scheduler: str, max_steps: int) -> None:
        super().__init__()
        self.scheduler, self.max_steps = scheduler, max_steps
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = MetaOptimize(self.net.named_parameters(), base="adamw", meta="lion", alpha0=1e-4, meta_lr=1e-2)
        if self.scheduler == "none":
            return optimizer  # MetaOptimize learns the step size: no scheduler needed
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RecordStepSizes(lightning.Callback):
    """Records optimizer.step_sizes() after every optimizer step, read from the optimizer itself: what the logs
    must hold (the tests compare them)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = trainer.optimizers[0].step_sizes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--output-dir", default="runs/examples/lightning")
    parser.add_argument("--scheduler", choices=["none", "cosine"], default="none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    lightning.seed_everything(args.seed, verbose=False)
    digits = load_digits()
    data = torch.utils.data.TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                                          torch.tensor(digits.target))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    record = RecordStepSizes()
    trainer = lightning.Trainer(
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        logger=CSVLogger(args.output_dir, name="", version=""),
        callbacks=[StepSizeCallback(), record],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(args.scheduler, args.max_steps), loader)
    (Path(args.output_dir) / "step_sizes_by_step.json").write_text(json.dumps(record.by_step, indent=1))
    print(f"step {trainer.global_step}: step_size {trainer.optimizers[0].step_sizes()['step_size']:.3g}, "
          f"metrics in {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
