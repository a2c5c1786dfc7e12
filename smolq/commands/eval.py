"""`smolq eval MODEL --text FILE [--kl-against REF]`: perplexity, and the numbers quants are compared by.

MODEL and REF are HF dirs, GPTQ dirs, GGUF or legacy files. The measurement
(windows, backends, tokenizer) is smolq.pipeline.evaluate; the statistics,
as llama-perplexity computes them, smolq.pipeline.eval_stats; this module
only renders them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from smolq.pipeline.evaluate import evaluate
from smolq.progress import emit_json

SCORE_HELP = ("second-half: llama-perplexity's windows (BOS first, the second half of each window scored); "
              "all: every token after a window's first, no BOS.")
BACKEND_HELP = ("auto: llama-cpp-python for a GGUF it loads, else reference; llama: every model file through "
                "llama-cpp-python; reference: smolq's forward pass (directories: transformers, always).")


def _pm(value: float, unc: float, digits: int, scale: float = 1.0, unit: str = "") -> str:
    return f"{value * scale:.{digits}f} ± {unc * scale:.{digits}f}{unit}"


def kl_rows(stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, value, what it means) for the numbers against the reference."""
    kld, top, dp = stats["kld"], stats["same_top"], stats["p_diff"]
    return [
        ("PPL(ref)", _pm(stats["ppl_ref"]["value"], stats["ppl_ref"]["unc"], 4), "reference's perplexity"),
        ("ln(PPL/PPL(ref))", _pm(stats["ln_ppl_ratio"]["value"], stats["ln_ppl_ratio"]["unc"], 5),
         "log perplexity ratio"),
        ("mean KLD", _pm(kld["mean"], kld["unc"], 6), "KL(ref || model), nats/token"),
        ("median KLD", f"{kld['median']:.6f}", ""),
        ("90% KLD", f"{kld['p90']:.6f}", ""),
        ("95% KLD", f"{kld['p95']:.6f}", ""),
        ("99% KLD", f"{kld['p99']:.6f}", "the worst 1% of tokens"),
        ("max KLD", f"{kld['max']:.6f}", ""),
        ("same top token", _pm(top["value"], top["unc"], 3, 100, " %"), "llama.cpp's 'Same top p'"),
        ("mean Δp", _pm(dp["mean"], dp["unc"], 3, 100, " %"), "p(next token) minus ref's"),
        ("RMS Δp", _pm(dp["rms"], dp["rms_unc"], 3, 100, " %"), ""),
    ]


def render(summary: dict[str, Any]) -> str:
    """The eval report as text: where each number came from, then one row per number."""
    stats = summary["stats"]
    how = "second half of each window" if summary["score"] == "second-half" else "every token after the first"
    lines = [f"model: {summary['model']}  [{summary['backend']}]"]
    if "kl_against" in summary:
        lines.append(f"ref:   {summary['kl_against']}  [{summary['ref_backend']}]")
    lines.append(f"text:  {summary['text']}, {summary['n_windows']} windows x {summary['ctx']} tokens, "
                 f"{summary['n_tokens']} scored ({how}); tokenizer {summary['tokenizer']}")
    rows = [("PPL", _pm(stats["ppl"]["value"], stats["ppl"]["unc"], 4), "perplexity; ± is one standard error")]
    if "kld" in stats:
        rows += kl_rows(stats)
    width = max(len(label) for label, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    lines += [f"  {label:<{width}}  {value:>{value_width}}  {note}".rstrip() for label, value, note in rows]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command(name="eval")
    def eval_command(
        model: Path = typer.Argument(..., metavar="MODEL", help="HF dir, GPTQ dir, GGUF or legacy file."),
        text: Path = typer.Option(..., "--text", help="Evaluation text (UTF-8).", rich_help_panel="Input/output"),
        ctx: int = typer.Option(512, "--ctx", help="Window length in tokens.", rich_help_panel="Input/output"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (HF and GPTQ models).", rich_help_panel="Performance"),
        kl_against: Optional[Path] = typer.Option(None, "--kl-against", help="Reference model: KLD, same top token, Δp.", rich_help_panel="Input/output"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="HF dir whose tokenizer to use.", rich_help_panel="Input/output"),
        max_windows: int = typer.Option(0, "--max-windows", help="Evaluate at most this many windows (0 = all).", rich_help_panel="Input/output"),
        score: str = typer.Option("second-half", "--score", help=SCORE_HELP, rich_help_panel="Input/output"),
        backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP, rich_help_panel="Performance"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Perplexity of a model on a text and, against a reference, the numbers llama-perplexity reports."""

        summary = evaluate(model, text, ctx=ctx, device=device, kl_against=kl_against, tokenizer=tokenizer,
                           max_windows=max_windows, backend=backend, score=score)
        if json_out:
            emit_json(summary)
        else:
            print(render(summary))
