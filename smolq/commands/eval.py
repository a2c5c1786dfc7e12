"""`smolq eval MODEL --text FILE`: perplexity (and KL against a reference model).

MODEL is an HF directory, a GPTQ directory, or a GGUF / legacy file (tokenized
with --tokenizer DIR or the --kl-against directory). The measurement itself
(non-overlapping windows of --ctx tokens) is smolq.pipeline.evaluate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolq.pipeline.evaluate import evaluate
from smolq.progress import emit_json


def register(app: typer.Typer) -> None:
    @app.command(name="eval")
    def eval_command(
        model: Path = typer.Argument(..., metavar="MODEL", help="HF dir, GPTQ dir, GGUF or legacy file."),
        text: Path = typer.Option(..., "--text", help="Evaluation text (UTF-8).", rich_help_panel="Input/output"),
        ctx: int = typer.Option(512, "--ctx", help="Window length in tokens.", rich_help_panel="Input/output"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (HF and GPTQ models).", rich_help_panel="Performance"),
        kl_against: Optional[Path] = typer.Option(None, "--kl-against", help="Reference model for KL divergence.", rich_help_panel="Input/output"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="HF dir whose tokenizer to use.", rich_help_panel="Input/output"),
        max_windows: int = typer.Option(0, "--max-windows", help="Evaluate at most this many windows (0 = all).", rich_help_panel="Input/output"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Perplexity of a model on a text file (non-overlapping windows)."""

        summary = evaluate(model, text, ctx=ctx, device=device, kl_against=kl_against, tokenizer=tokenizer,
                           max_windows=max_windows)
        if json_out:
            emit_json(summary)
        else:
            line = f"{model}: ppl {summary['ppl']:.4f} over {summary['n_tokens']} tokens ({summary['n_windows']} x {ctx})"
            if "kl" in summary:
                line += f", KL vs {kl_against} {summary['kl']:.5f}"
            print(line)
