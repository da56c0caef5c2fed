"""Run report: Markdown summary plus PNG plots of the loss curves and k-NN accuracy per phase.

Written by `dinoray run` at the end of a pipeline to `{storage}/{name}/report/`. To rebuild it:

    python -m orchestrator.pipeline.report runs/smoke
"""
from __future__ import annotations

import io
import json
import sys

from orchestrator import storage

LOSS_KEYS = ("loss", "loss_dino_global", "loss_dino_local", "loss_ibot", "loss_koleo", "loss_gram")


def read_jsonl(url: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = storage.fs_for(url, storage_options)
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as fh:
        return [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]


def _training_keys(state: dict) -> list[tuple[str, str]]:
    """(phase name, run key) for every training run: distill students are '<phase>-<arch>'."""
    out = []
    for entry in state["phases"]:
        if entry["kind"] in ("pretrain", "highres"):
            out.append((entry["name"], entry["name"]))
        elif entry["kind"] == "distill":
            out.extend((entry["name"], key) for key in entry.get("metrics", {}))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_report(root: str, state: dict, storage_options: dict | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = f"{root}/report"
    lines = [f"# dinoray run `{state['name']}`", "", f"Storage: `{state['storage']}`", "",
             "| phase | kind | state | steps | time (s) | final loss | k-NN top-1 |", "|---|---|---|---|---|---|---|"]
    knn = knn_table(state)
    curves = {key: read_jsonl(f"{root}/{key}/metrics.jsonl", storage_options) for _, key in _training_keys(state)}
    for entry in state["phases"]:
        keys = [k for p, k in _training_keys(state) if p == entry["name"]]
        final = "; ".join(f"{k}: {curves[k][-1]['loss']:.4f}" for k in keys if curves.get(k) and "loss" in curves[k][-1])
        acc = "; ".join(f"{src} k={k}: {100 * v:.2f}%" for src, ks in knn.items() if entry["kind"] == "eval"
                        and src in entry.get("metrics", {}) for k, v in ks.items())
        lines.append(f"| {entry['name']} | {entry['kind']} | {entry['state']} | {entry['step']}/{entry['steps']} | "
                     f"{entry.get('seconds', 0):.0f} | {final or '-'} | {acc or '-'} |")

    if any(curves.values()):
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (key, rows) in zip(axes[0], curves.items()):
            for name in LOSS_KEYS:
                pts = [(r["step"], r[name]) for r in rows if name in r]
                if pts:
                    ax.plot(*zip(*pts), label=name.replace("loss_", "") if name != "loss" else "total")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        storage.atomic_write_bytes(f"{out}/losses.png", _png(fig), storage_options)
        plt.close(fig)
        lines += ["", "## Loss curves", "", "![losses](losses.png)"]
    if knn:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(knn)
        for j, k in enumerate(sorted({k for ks in knn.values() for k in ks})):
            ax.bar([i + 0.4 * j for i in range(len(names))], [100 * knn[n].get(k, 0) for n in names], 0.4, label=f"k={k}")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_ylabel("k-NN top-1 (%)")
        ax.legend()
        storage.atomic_write_bytes(f"{out}/knn.png", _png(fig), storage_options)
        plt.close(fig)
        lines += ["", "## k-NN accuracy", "", "![knn](knn.png)"]
    storage.atomic_write_bytes(f"{out}/report.md", "\n".join(lines + [""]).encode(), storage_options)
    return f"{out}/report.md"


def knn_table(state: dict) -> dict[str, dict[str, float]]:
    """{evaluated run key: {k: top-1}} over every finished eval phase."""
    table = {}
    for entry in state["phases"]:
        if entry["kind"] == "eval":
            for src, res in entry.get("metrics", {}).items():
                table[src] = res.get("top1", {})
    return table


if __name__ == "__main__":
    from orchestrator.pipeline import controller
    root = sys.argv[1].rstrip("/")
    print(write_report(root, controller.status(root)))
