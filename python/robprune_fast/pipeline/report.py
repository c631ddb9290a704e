"""The run's report: one row for the dense network and one per pruned variant, each figure also
as a percentage of the dense one, in report.md, and a plot of benign / PGD / verified accuracy
against the compression ratio in report.png (matplotlib)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from .._atomic import atomic_write  # noqa: E402


def _accuracies(row: dict) -> dict[str, float | None]:
    e = row["eval"]
    verified = e.get("verified", {})
    return {"benign": e["benign_acc"], "PGD": e["pgd"]["acc"],
            "AutoAttack": e.get("autoattack", {}).get("acc"),
            "IBP-verified": verified.get("ibp", {}).get("acc"),
            "CROWN-IBP-verified": verified.get("crown-ibp", {}).get("acc"),
            "CROWN-verified": verified.get("crown", {}).get("acc")}


def _cell(value, dense):
    if value is None:
        return "-"
    share = f" ({value / dense:.0%})" if dense else ""
    return f"{value:.2%}{share}"


def table(rows: list[dict]) -> str:
    """The markdown table of the run (first row: the dense network)."""
    dense = _accuracies(rows[0])
    columns = [k for k in dense if any(_accuracies(r)[k] is not None for r in rows)]
    head = ["variant", "nonzero params", "compression", "file size"] + columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        acc, files = _accuracies(row), row["files"]
        size = files.get("compact_bytes", files["dense_bytes"])
        cells = [row["variant"], f"{files['nonzero_parameters']:,}",
                 f"{row['weights']['compression']:.1f}x", f"{size / 1024:.1f} KiB"]
        cells += [_cell(acc[k], dense[k]) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _subset_line(rows: list[dict]) -> str:
    subset = rows[0]["eval"].get("subset", {})
    if subset.get("selection") == "full":
        return f"Evaluated on the full test split ({subset['n']} points)."
    return (f"Evaluated on a seeded class-stratified sample of {subset.get('n')} of "
            f"{subset.get('of')} test points (seed {subset.get('seed')}).")


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against compression, one line per strategy and measure, the dense network at 1x."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = rows[0]
    measures = [k for k in ("benign", "PGD", "IBP-verified", "CROWN-IBP-verified")
                if _accuracies(dense)[k] is not None]
    strategies = sorted({r["strategy"] for r in rows[1:]})
    for measure, color in zip(measures, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for strategy, style in zip(strategies, ("-", "--", ":", "-.")):
            points = [(1.0, _accuracies(dense)[measure])] + sorted(
                (r["weights"]["compression"], _accuracies(r)[measure])
                for r in rows[1:] if r["strategy"] == strategy)
            ax.plot(*zip(*points), style, marker="o", color=color, label=f"{measure}, {strategy}")
    ax.set_xscale("log")
    ax.set_xlabel("compression (dense weights / kept weights)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write(out: Path, results: dict) -> None:
    """report.md and report.png of a run's results."""
    rows, config = results["rows"], results["config"]
    eps = config["eval"]["eps"] if config["eval"]["eps"] is not None else config["objective"]["eps"]
    text = "\n".join([
        f"# {config['name']}: {config['model']['name']} on {config['data']['dataset']}",
        "",
        f"Objective {config['objective']['name']} at eps {eps:g} (L-inf, pixels in [0, 1]); "
        f"pruning {config['prune']['structure']}, scope {config['prune']['scope']}, schedule "
        f"{config['prune']['schedule']}; fine-tuning "
        f"{'on' if config['finetune']['enabled'] else 'off'}. {_subset_line(rows)} Percentages "
        "are of the dense network's figure.",
        "",
        table(rows),
        "",
        "![accuracy against compression](report.png)",
        ""])
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    plot(rows, out / "report.png")
