"""Central fine-tuning on one machine (`fedfar finetune`): a GLUE task, a model, a method; a results folder."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import by_length, compute_metrics, get_task, load_glue, make_loader, resolve_source, tokenize
from .devices.gpu import resolve_device
from .methods import parse_method
from .models import load_model, load_tokenizer
from .train import TrainConfig, predict, train


@dataclass
class FinetuneConfig:
    task: str = "cola"
    model: str = "minilm"
    method: str = "far10"
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    seed: int = 0
    max_length: int = 128
    data: str = ""  # "hub", a classic GLUE folder, or "" for the local default (../shared/data/glue)
    max_train_examples: int = 0  # 0 = all; for quick looks
    priming_share: float = 0.01
    preact_storage: str = "bfloat16"
    out: str = ""
    save_model: bool = True
    device: str = "cpu"  # or "cuda" where torch sees a GPU

    def validate(self) -> tuple:
        """Fail before any compute: returns (task, spec)."""
        task = get_task(self.task)
        spec = parse_method(self.method)
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")
        resolve_device(self.device)
        return task, spec


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune, evaluate on the dev set after each epoch, write config, metrics and the merged model."""
    task, spec = cfg.validate()
    source = resolve_source(cfg.data)
    out = Path(cfg.out or f"results/finetune/{task.name}-{spec.label}-seed{cfg.seed}")
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out} holds a finished run (metrics.json): give --out a new folder, or remove it "
                              "to run again")
    torch.manual_seed(cfg.seed)

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    train_ds = load_glue(task, "train", source)
    if cfg.max_train_examples:
        train_ds = train_ds.shuffle(seed=cfg.seed).select(range(min(cfg.max_train_examples, len(train_ds))))
    dev_ds = load_glue(task, task.dev_splits[0], source)
    train_loader = make_loader(tokenize(train_ds, tokenizer, task, cfg.max_length), tokenizer, cfg.batch_size,
                               shuffle=True, seed=cfg.seed)
    dev_loader = make_loader(by_length(tokenize(dev_ds, tokenizer, task, cfg.max_length)), tokenizer, 128,
                             shuffle=False)
    model = spec.attach(load_model(cfg.model, task.num_labels, seed=cfg.seed), cfg.seed)
    model.to(resolve_device(cfg.device))
    out.mkdir(parents=True, exist_ok=True)  # the run really starts: data and model are loaded
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    history: list[dict] = []
    total = int(cfg.epochs * len(train_loader) + 0.999)
    bar = tqdm(total=total, desc=f"{task.name} {spec.label}", disable=not progress, unit="step")
    train_time = [0.0]
    t_epoch = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    def on_epoch(epoch: int) -> None:
        train_time[0] += time.perf_counter() - t_epoch[0]
        logits, labels = predict(model, dev_loader)
        metrics = compute_metrics(task, logits, labels)
        history.append({"epoch": epoch, "train_time_s": train_time[0], **metrics})
        bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        t_epoch[0] = time.perf_counter()

    tcfg = TrainConfig(lr=cfg.lr, seed=cfg.seed, priming_share=cfg.priming_share, preact_storage=cfg.preact_storage)
    result = train(model, train_loader, spec, cfg.epochs, tcfg, on_step=on_step, on_epoch=on_epoch)
    bar.close()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec.export(model)  # the plain transformers model (FAR merged back, LoRA folded in): an ordinary checkpoint
    if cfg.save_model:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    summary = {
        "task": task.name, "method": spec.label, "seed": cfg.seed, "metric": task.primary_metric,
        "final": history[-1], "history": history, "steps": result["steps"],
        "priming_steps": result["priming_steps"], "trainable_params": trainable,
        "train_time_s": train_time[0], "wall_time_s": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
