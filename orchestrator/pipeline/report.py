"""Run report: a Markdown summary plus PNG plots of the trained loss terms and the eval results.

Written by `dinoray run` at the end of a pipeline to the run's report/ folder. To rebuild it:

    python -m orchestrator.pipeline.report jobs/smoke_cpu.yaml
"""
from __future__ import annotations

import io
import sys

from model.losses import LOSS_PARTS
from orchestrator.layout import RunLayout
from orchestrator.pipeline import config

def trained_parts(model_cfg) -> list[str]:
    """The loss terms a phase really trains: those whose weight (`<term>_loss_weight`) is above 0."""
    return [part for part in LOSS_PARTS if getattr(model_cfg, f"{part.split('_')[0]}_loss_weight", 0) > 0]


def results_line(res: dict) -> str:
    """One eval result with its yardsticks: 'k=20 36.9% (random init 27.9%, pixels 30.1%); linear ...'."""
    def fmt(r: dict) -> dict[str, str]:
        out = {}
        if "knn" in r:
            out["knn"] = ", ".join(f"k={k} {100 * v:.1f}%" for k, v in r["knn"]["top1"].items())
        if "linear" in r:
            out["linear"] = f"linear {100 * r['linear']['top1']:.1f}%"
        if "retrieval" in r:
            out["retrieval"] = f"copy mAP {100 * r['retrieval']['map']:.1f}%"
        return out
    ours, bases = fmt(res), {name.replace("_", " "): fmt(r) for name, r in res.get("baselines", {}).items()}
    parts = []
    for method, text in ours.items():
        refs = [f"{name} {b[method]}" for name, b in bases.items() if method in b]
        parts.append(text + (f" (vs {'; '.join(refs)})" if refs else ""))
    return "; ".join(parts) or "-"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _loss_plot(plt, curves: dict[str, tuple[list[dict], list[str]]]) -> bytes:
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (key, (rows, parts)) in zip(axes[0], curves.items()):
        for name in ("loss", *(f"loss_{p}" for p in parts)):
            points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
            if points:
                ax.plot(*zip(*points), label="total" if name == "loss" else name[len("loss_"):])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    png = _png(fig)
    plt.close(fig)
    return png


def _knn_plot(plt, knn: dict[str, dict]) -> bytes:
    """k-NN top-1 (largest k) of each evaluated backbone, in phase order, with the yardsticks as lines."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(knn)
    top = [100 * max(res["knn"]["top1"].items(), key=lambda kv: int(kv[0]))[1] for res in knn.values()]
    ax.plot(names, top, "o-", label="trained")
    for i, (name, base) in enumerate(next(iter(knn.values())).get("baselines", {}).items()):
        if "knn" in base:
            acc = 100 * max(base["knn"]["top1"].items(), key=lambda kv: int(kv[0]))[1]
            ax.axhline(acc, linestyle="--", color=f"C{i + 1}", label=name.replace("_", " "))
    ax.set_ylabel("k-NN top-1 (%)")
    ax.legend(fontsize=7)
    png = _png(fig)
    plt.close(fig)
    return png


def write_report(job, layout: RunLayout, run_state: dict) -> str:
    """Write report.md (+ losses.png, knn.png) under the run's report folder; returns report.md's URL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}   # phase folder -> (metrics records, trained loss terms)
    for phase in job.phases:
        if phase.kind in config.TRAINING_KINDS:
            parts = trained_parts(config.resolve(job, phase).model)
            for key, phase_dir in layout.phase_dirs(phase).items():
                curves[key] = (phase_dir.metrics.read_jsonl(), parts)
    knn = {src: res for entry in run_state["phases"] if entry["kind"] == "eval"
           for src, res in entry.get("metrics", {}).items() if "knn" in res}
    lines = [f"# dinoray run `{run_state['name']}`", "", f"Storage: `{run_state['storage']}`", "",
             "| phase | kind | state | steps | time (s) | final loss | results (vs yardsticks) |",
             "|---|---|---|---|---|---|---|"]
    for phase, entry in zip(job.phases, run_state["phases"]):
        keys = list(layout.phase_dirs(phase)) if phase.kind in config.TRAINING_KINDS else []
        final = "; ".join(f"{k}: {curves[k][0][-1]['loss']:.4f}" for k in keys if curves[k][0])
        results = "; ".join(f"{src}: {results_line(res)}" for src, res in entry.get("metrics", {}).items()) \
            if entry["kind"] == "eval" else ""
        lines.append(f"| {entry['name']} | {entry['kind']} | {entry['state']} | {entry['step']}/{entry['steps']} | "
                     f"{entry.get('seconds', 0):.0f} | {final or '-'} | {results or '-'} |")
    if any(rows for rows, _ in curves.values()):
        (layout.report / "losses.png").write_bytes(_loss_plot(plt, curves))
        lines += ["", "## Loss curves (the terms each phase trains)", "", "![losses](losses.png)"]
    if knn:
        (layout.report / "knn.png").write_bytes(_knn_plot(plt, knn))
        lines += ["", "## k-NN accuracy over the phases, yardsticks dashed", "", "![knn](knn.png)"]
    report = layout.report / "report.md"
    report.write_bytes("\n".join(lines + [""]).encode())
    return report.url


if __name__ == "__main__":
    from orchestrator.pipeline import state
    job = config.load_job(sys.argv[1], sys.argv[2:])
    layout = RunLayout.of(job)
    print(write_report(job, layout, state.read(layout)))
