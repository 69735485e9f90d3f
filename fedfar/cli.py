"""The `fedfar` command: finetune (central), bench (speed and memory), run (federated simulation), certs (keys
for a secure deployment)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from dataclasses import fields


def _finetune(args: argparse.Namespace) -> None:
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    summary = finetune(cfg)
    final = summary["final"]
    print(f"\n{summary['task']} {summary['method']} seed {summary['seed']}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("epoch", "train_time_s"))
          + f"  | train {summary['train_time_s']:.0f} s, wall {summary['wall_time_s']:.0f} s")
    print(f"results: {cfg.out or 'results/finetune/...'} (config.json, metrics.json, model/)")


def _bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import format_table, run_bench, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    print(f"fedfar bench: {args.model}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    rows = run_bench(args.model, methods, args.batch_size, args.seq_len, args.repeats, args.warmup,
                     preact_storage=args.preact_storage, seed=args.seed)
    for r in rows:
        r.update(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len,
                 threads=torch.get_num_threads(), preact_storage=args.preact_storage)
    print()
    print(format_table(rows))
    print(f"(x = ratio to {rows[0]['method']}, same run)")
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")


def _parse_value(text: str):
    """TOML-ish scalar: true/false, int, float, else string."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip('"')


def _run(args: argparse.Namespace) -> None:
    import json
    import time
    from datetime import datetime

    from .federation.config import RunConfig
    from .federation.launch import PROJECT_DIR, run_config_values, run_simulation

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set num-rounds=2")
        overrides[key.strip()] = _parse_value(value.strip())
    if args.resume:  # the run's own config and node count, from its folder
        from .federation import checkpoint

        if overrides or args.config_given:
            raise ValueError("--resume continues a run exactly as it was configured: drop the config file and --set")
        folder = Path(args.resume).expanduser().resolve()
        meta = checkpoint.latest(folder)
        if meta is None or not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no checkpoint/latest.json and config.json there: "
                                    "the run stopped before its first round was saved, or it is not a run folder")
        overrides = {**json.loads((folder / "config.json").read_text()), "resume": str(folder)}
        args.config = None
        args.supernodes = meta["num_nodes"]
        print(f"fedfar run: resuming {folder} after round {meta['round']}, {args.supernodes} supernodes")
    # Validate the whole run config here, before a SuperLink or Ray starts.
    values = run_config_values(args.config, overrides)
    for key in ("fleet", "device-catalog", "faults"):  # the app runs in the project directory: absolute paths
        if values.get(key):
            overrides[key] = values[key] = str(Path(values[key]).expanduser().resolve())
    cfg = RunConfig.from_flower(values)
    if (cfg.device == "cuda") != (args.gpus_per_client > 0):
        raise ValueError(f"device {cfg.device!r} with --gpus-per-client {args.gpus_per_client:g}: clients train on "
                         "a GPU only with both --set device=cuda and a GPU share (Ray hides GPUs from clients "
                         "without one), e.g. --set device=cuda --gpus-per-client 0.25")
    from .devices.gpu import resolve_device

    resolve_device(cfg.device)  # cuda without a GPU here: say so before a SuperLink or Ray starts
    check_data(cfg)
    if cfg.fleet:  # every device must at least hold the model: say so now, not after Ray has started
        from .data import get_task
        from .devices.device import check_fleet
        from .models import load_model

        check_fleet(cfg, args.supernodes, load_model(cfg.model, get_task(cfg.task).num_labels, seed=cfg.seed))
    name = cfg.run_name or f"{cfg.task}-{cfg.label}-{datetime.now():%Y%m%d-%H%M%S}"
    overrides["run-name"] = name
    if not args.resume:
        overrides["resume"] = ""  # a config file cannot make a fresh run continue an old one by accident
    t0 = time.perf_counter()
    code = run_simulation(args.config, args.supernodes, args.cpus_per_client, overrides,
                          gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
    wall = time.perf_counter() - t0
    folder = Path(cfg.resume) if cfg.resume else Path(PROJECT_DIR) / cfg.results_dir / name
    summary_path = folder / "summary.json"
    if code != 0 or not summary_path.exists():
        print(f"fedfar run: the run did not complete (exit {code}); partial results, if any: {folder}; "
              f"logs: {PROJECT_DIR / '.flwr' / 'local-superlink'}", file=sys.stderr)
        sys.exit(code or 1)
    s = json.loads(summary_path.read_text())
    s.update(launcher_wall_s=wall, launcher_overhead_s=wall - s["busy_s"],
             launcher_overhead_share=(wall - s["busy_s"]) / wall)
    summary_path.write_text(json.dumps(s, indent=2))
    metric = s["metric"]
    where = "dev" if s.get("eval_set", "dev") == "dev" else "holdout"  # holdout-examples: carved from train
    print()
    print(f"{'run':<44}{where + ' ' + metric:>12}{'MB up':>10}{'MB down':>10}{'wall s':>9}{'other s':>9}{'other %':>9}")
    print(f"{name:<44}{s['final_metric']:>12.4f}{s['mb_up']:>10.2f}{s['mb_down']:>10.2f}{wall:>9.0f}"
          f"{s['launcher_overhead_s']:>9.0f}{100 * s['launcher_overhead_share']:>8.1f}%")
    print(f"({s['clients']} clients, {s['rounds']} rounds; {where} {metric} before training {s['initial_metric']:.4f}. "
          "'other' = wall time outside local training and evaluation: start-up of Flower and Ray, model "
          "loading, data preparation, serialization, aggregation)")
    if "participation" in s:
        print(f"devices: {s['participation']:.0%} of {s['selections']} selections trained "
              f"({s['selections_oom']} out of memory, {s['selections_late']} late); never trained: "
              f"{', '.join(s['devices_never_trained']) or 'none'}; simulated time {s['sim_time_s'] / 60:.1f} min")
    print(f"results: {folder}  (rounds.csv, ledger.csv, partitions.json, summary.json, metric_vs_round_and_mb.png)")


def _certs(args: argparse.Namespace) -> None:
    from .federation.certs import generate, split_names

    hosts = [h for h in args.hosts.split(",") if h.strip()]
    ips = [i for i in args.ips.split(",") if i.strip()]
    paths = generate(args.out, hosts, ips, args.supernodes, days=args.days, overwrite=args.force)
    names, addresses = split_names(hosts, ips)
    print(f"wrote {paths.folder}: ca.crt, ca.key, server.crt, server.key"
          + (f", supernode-<i>.key/.pub for i = 0..{args.supernodes - 1}" if args.supernodes else ""))
    print(f"server certificate valid for: {', '.join(names + [str(a) for a in addresses])}")
    print("keep ca.key and server.key on the server; give each device ca.crt and its own supernode-<i>.key; "
          "register each supernode-<i>.pub with `flwr supernode register` (see docs/deployment.md)")


def check_data(cfg) -> None:
    """Load the task's train and dev files now (a missing folder, file or column is an error naming it), not
    a minute later inside Flower and Ray. The hub is not checked: that needs the internet."""
    if cfg.data == "hub":
        return
    from .data import get_task, load_glue

    task = get_task(cfg.task)
    for split in ("train", task.dev_splits[0]):
        load_glue(task, split, cfg.data_source)


def _node_worker(args: argparse.Namespace) -> None:
    from .federation.node_worker import serve

    serve(Path(args.socket), args.ready_file)


def build_parser() -> argparse.ArgumentParser:
    from .finetune import FinetuneConfig
    from .methods import METHOD_HELP

    p = argparse.ArgumentParser(prog="fedfar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = FinetuneConfig()
    ft = sub.add_parser("finetune", help="fine-tune one model centrally on a GLUE task",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ft.add_argument("--task", default=d.task, help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    ft.add_argument("--model", default=d.model,
                    help="'minilm' (packaged), a save_pretrained folder, 'random:<shape>', or a hub id")
    ft.add_argument("--method", default=d.method, help=METHOD_HELP)
    ft.add_argument("--epochs", type=float, default=d.epochs)
    ft.add_argument("--batch-size", type=int, default=d.batch_size)
    ft.add_argument("--lr", type=float, default=d.lr)
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--max-length", type=int, default=d.max_length)
    ft.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="where to train")
    ft.add_argument("--data", default=d.data, help="'hub', a classic GLUE folder; default: ../shared/data/glue "
                                                  "or $FEDFAR_GLUE_DIR")
    ft.add_argument("--max-train-examples", type=int, default=d.max_train_examples, help="0 = all")
    ft.add_argument("--priming-share", type=float, default=d.priming_share)
    ft.add_argument("--preact-storage", default=d.preact_storage, choices=["float32", "bfloat16", "recompute"],
                    help="how FAR's frozen branch keeps its pre-activation for backward")
    ft.add_argument("--out", default=d.out, help="results folder (default results/finetune/<task>-<method>-seed<s>)")
    ft.add_argument("--no-save-model", dest="save_model", action="store_false")
    ft.set_defaults(func=_finetune)

    b = sub.add_parser("bench", help="step time and training memory of methods, one model and batch shape",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--model", default="random:distilbert-base")
    b.add_argument("--methods", default="full,far10,far10-emb,far10-attn,random10-emb,bitfit,lora8,lora8-all",
                   help="comma-separated; ratios are to the first")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--preact-storage", default="bfloat16", choices=["float32", "bfloat16", "recompute"])
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default="", help="write the rows as a JSON list to this path")
    b.set_defaults(func=_bench)

    r = sub.add_parser("run", help="a federated simulation of the Flower app (Ray), with its summary",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("config", nargs="?", default=None, help="run-config TOML (default configs/quickstart.toml)")
    r.add_argument("--supernodes", type=int, default=6, help="simulated devices (= data partitions)")
    r.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per ClientApp (whole number)")
    r.add_argument("--gpus-per-client", type=float, default=0.0,
                   help="Ray GPU share per ClientApp (e.g. 0.25: four clients per GPU); needs --set device=cuda")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. --set num-rounds=2 (repeatable)")
    r.add_argument("--ray-address", default="", metavar="HOST:PORT",
                   help="run the clients on an existing Ray cluster (its head's address) instead of a local Ray")
    r.add_argument("--resume", default="", metavar="RUN_FOLDER",
                   help="continue a run from its last complete round (its own config and node count)")
    r.set_defaults(func=_run)

    c = sub.add_parser("certs", help="a CA, the SuperLink's TLS certificate and SuperNode auth keys for a secure "
                                     "deployment (docs/deployment.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--out", required=True, help="folder to write (refused if not empty, unless --force)")
    c.add_argument("--hosts", default="", help="comma-separated DNS names SuperNodes use to reach the SuperLink; "
                                               "localhost is always included")
    c.add_argument("--ips", default="", help="comma-separated IP addresses SuperNodes use to reach the SuperLink; "
                                             "127.0.0.1 is always included")
    c.add_argument("--supernodes", type=int, default=2, help="ECDSA P-384 key pairs, one per SuperNode")
    c.add_argument("--days", type=int, default=730, help="validity of the server certificate")
    c.add_argument("--force", action="store_true", help="replace the files of an existing folder")
    c.set_defaults(func=_certs)

    w = sub.add_parser("node-worker", help="a SuperNode's warm worker: serves its ClientApp's messages from one "
                                           "long-lived process (node config worker=<socket>; docs/deployment.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w.add_argument("--socket", required=True, help="Unix socket to serve on; the same path goes in the SuperNode's "
                                                   "node config as worker=<path>")
    w.add_argument("--ready-file", default="", help="written with the worker's pid once it accepts connections")
    w.set_defaults(func=_node_worker)
    return p


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        args.config_given = args.config is not None
        if args.config is None and not args.resume:
            args.config = "configs/quickstart.toml"
    from .models import quiet_libraries

    quiet_libraries()  # our own progress bars say what is happening; the libraries' per-file bars bury them
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"fedfar: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
