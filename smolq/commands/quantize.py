"""`smolq quantize IN OUT --type T`: options in, smolq.pipeline.requantize.run, a summary out.

The work (RTN on GGUF / legacy files, HF checkpoints handed to convert or
GPTQ) lives in smolq/pipeline/requantize.py; this module parses and renders.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from smolq import api
from smolq.commands.render import render_quantized
from smolq.transforms.gptq import HESSIAN_REG_DEFAULT

EPILOG = (
    "Examples:\n\n"
    "  smolq quantize model-f16.gguf model-q4_k_m.gguf --type q4_k_m\n\n"
    "  smolq quantize model-f16.gguf model-q4_0.gguf --bits 4 --pure --dry-run\n\n"
    "  smolq quantize ggml-model-f16.bin ggml-model-q4_0.bin --type q4_0   (ggjt v3 out)\n\n"
    "  smolq quantize model-f16.gguf model-q4_k_m.gguf --type q4_k_m --imatrix model.imatrix\n\n"
    "  smolq quantize model-f16.gguf model-80m.gguf --target-size 80MiB --imatrix model.imatrix --dry-run\n\n"
    "  smolq quantize finetune-f16.gguf finetune.gguf --recipe base.recipe.json\n\n"
    "  smolq quantize ./hf-model out.gguf --type q4_0 --calib text.txt   (GPTQ, calibrated on the text)\n\n"
    "  smolq quantize ./hf-model out-gptq --method gptq --format gptq --bits 3 --act-order --calib text.txt\n\n"
    "  smolq quantize ./hf-model out.gguf --type q3_k_m --method gptq --calib text.txt --resume   (after Ctrl-C)\n\n"
    "  smolq quantize ./hf-model out-mlc/ --format mlc --type q4f16_1   (MLC-LLM weights)\n\n"
    "  smolq quantize ./hf-model out-nf4/ --format nf4   (bitsandbytes 4-bit, loads with transformers)"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def quantize(
        src: Path = typer.Argument(..., metavar="IN", help="GGUF / legacy ggml file, or a Hugging Face checkpoint directory."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output file (written atomically)."),
        type_name: Optional[str] = typer.Option(None, "--type", "-t", help="Preset, as llama-quantize names them (q4_0 q4_1 q5_0 q5_1 q8_0, q2_k q2_k_s q3_k_s/m/l q4_k_s/m q5_k_s/m q6_k, iq1_s/m iq2_xxs/xs/s/m iq3_xxs/xs/s/m iq4_nl/xs, mxfp4_moe, tq1_0 tq2_0, f16 bf16 f32; case-insensitive), or a plain type. IQ1/IQ2 mixes, iq3_xxs, iq3_xs and q2_k_s need an importance matrix.", rich_help_panel="Types and mix"),
        bits: Optional[int] = typer.Option(None, "--bits", "-b", help="2, 3, 4, 5, 6 or 8: the default preset for that width (4 -> q4_k_m).", rich_help_panel="Types and mix"),
        method: Optional[str] = typer.Option(None, "--method", help="rtn (round to nearest, C kernel) or gptq (needs the HF checkpoint); default: gptq with --calib, else rtn.", rich_help_panel="Types and mix"),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Output container: gguf, gguf-v1..v3, ggml, ggmf, ggjt-v1..v3, ggmm (default: the input's); mlc: MLC-LLM weights from an HF checkpoint (--type q4f16_1, q4f16_0, q3f16_1, q0f16); nf4, fp4: a bitsandbytes 4-bit directory from an HF checkpoint.", rich_help_panel="Input/output"),
        pure: bool = typer.Option(False, "--pure", help="No mixture: every quantizable tensor gets the base type.", rich_help_panel="Types and mix"),
        leave_output: bool = typer.Option(False, "--leave-output-tensor", help="Keep output.weight as it is.", rich_help_panel="Types and mix"),
        output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type for output.weight.", rich_help_panel="Types and mix"),
        token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type for token_embd.weight.", rich_help_panel="Types and mix"),
        tensor_type: Optional[List[str]] = typer.Option(None, "--tensor-type", help="REGEX=TYPE for matching tensors (repeatable; wins over the mix).", rich_help_panel="Types and mix"),
        imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp's GGUF or .dat, from smolq imatrix or llama-imatrix) for the block types, as llama-quantize --imatrix.", rich_help_panel="Importance matrix"),
        include_weights: Optional[List[str]] = typer.Option(None, "--include-weights", help="Use the imatrix only for entries whose name contains this (repeatable).", rich_help_panel="Importance matrix"),
        exclude_weights: Optional[List[str]] = typer.Option(None, "--exclude-weights", help="Do not use the imatrix for entries whose name contains this (repeatable; not with --include-weights).", rich_help_panel="Importance matrix"),
        allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow quantizing tensors that are already quantized (loses quality).", rich_help_panel="Types and mix"),
        threads: int = typer.Option(0, "--threads", help="Threads for the C kernel, torch and OpenMP together (0 = all available cores).", rich_help_panel="Performance"),
        calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (file, or .jsonl of {\"text\"} or {\"input_ids\"} records); default: sampled from the model.", rich_help_panel="GPTQ"),
        group_size: int = typer.Option(128, "--group-size", help="Columns per group (-1: one group per row).", rich_help_panel="GPTQ"),
        act_order: bool = typer.Option(False, "--act-order", help="Quantize columns in order of decreasing Hessian diagonal.", rich_help_panel="GPTQ"),
        asym: bool = typer.Option(False, "--asym", help="Asymmetric grid (zero point) instead of symmetric.", rich_help_panel="GPTQ"),
        damp: float = typer.Option(0.01, "--damp", help="Dampening, a fraction of the mean Hessian diagonal.", rich_help_panel="GPTQ"),
        nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration sequences (default: enough to cover the text about twice, at most 64).", rich_help_panel="GPTQ"),
        seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per calibration sequence (default: 512, or the text's length if shorter).", rich_help_panel="GPTQ"),
        device: str = typer.Option("cpu", "--device", help="GPTQ: torch device (cpu, cuda, auto).", rich_help_panel="Performance"),
        true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Quantize a block's linears in execution order, each on inputs from the already-quantized ones.", rich_help_panel="GPTQ"),
        static_groups: bool = typer.Option(False, "--static-groups", help="Choose every group's scale up front from the original weights (with --act-order).", rich_help_panel="GPTQ"),
        mse: float = typer.Option(0.0, "--mse", help="Int grid: clipping search with |err|^p, p = this value (2.4 in the reference); 0 = off.", rich_help_panel="GPTQ"),
        scale_rule: str = typer.Option("weighted", "--scale-rule", help="On ggml grids: how block scales are chosen (weighted, imatrix, plain).", rich_help_panel="GPTQ"),
        hessian_reg: str = typer.Option(HESSIAN_REG_DEFAULT, "--hessian-reg", metavar="auto|A", help="Shrink the Hessian toward its diagonal by A in [0, 1] (0: plain GPTQ, 1: weighted RTN); auto: chosen per linear by cross-validation on a held-out quarter of the calibration set; default: 0.75 onto ggml types (GGUF / legacy out), 0 for --format gptq.", rich_help_panel="GPTQ"),
        attention_aware: Optional[bool] = typer.Option(None, "--attention-aware/--no-attention-aware", help="The value projection's Hessian through the attention probabilities (LLaMA-like blocks and Gemma 3); default: on for ggml types, off for --format gptq.", rich_help_panel="GPTQ"),
        refit_scales: Optional[bool] = typer.Option(None, "--refit-scales/--no-refit-scales", help="After rounding, re-fit each row's fp16 scales (32-element block types, IQ4_NL) to the layer error with the codes fixed; default: see the README's GPTQ section.", rich_help_panel="GPTQ"),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration sampling (same seed, same output).", rich_help_panel="GPTQ"),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its saved blocks (same settings).", rich_help_panel="GPTQ"),
        double_quant: bool = typer.Option(True, "--double-quant/--no-double-quant", help="nf4/fp4: quantize the absmax values again (8-bit, blocks of 256), as bnb_4bit_use_double_quant=True.", rich_help_panel="bitsandbytes"),
        blocksize: int = typer.Option(64, "--blocksize", help="nf4/fp4: values per absmax block (32 ... 4096).", rich_help_panel="bitsandbytes"),
        target_bpw: Optional[float] = typer.Option(None, "--target-bpw", metavar="B", help="Instead of --type: choose each tensor's type (from --candidates) for the least predicted loss within B bits per weight of tensor data (GGUF in; or a checkpoint, and with --calib GPTQ onto the chosen types, the losses scaled by a KL probe).", rich_help_panel="Size budget"),
        target_size: Optional[str] = typer.Option(None, "--target-size", metavar="SIZE", help="As --target-bpw, for a file of at most SIZE bytes (80MiB, 1.2G, 123456; K/M/G decimal, KiB/MiB/GiB binary); never exceeded.", rich_help_panel="Size budget"),
        candidates: Optional[str] = typer.Option(None, "--candidates", metavar="T1,T2,...", help="Types the budget chooses from (default: q2_k q3_k q4_k q5_k q6_k q8_0 and the i-quants; those needing an imatrix only with --imatrix).", rich_help_panel="Size budget"),
        recipe: Optional[Path] = typer.Option(None, "--recipe", metavar="FILE", help="Apply a saved recipe (JSON tensor -> type, from --save-recipe or smolq inspect --recipe) to a model of the same shapes, without the loss pass.", rich_help_panel="Size budget"),
        save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", metavar="FILE", help="Write the run's tensor -> type as a JSON recipe (also with --dry-run).", rich_help_panel="Size budget"),
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE", help="GGUF in shards of at most SIZE bytes of tensor data (decimal K/M/G: 2G = 2*10^9), named OUT-00001-of-0000N.gguf as llama.cpp's gguf-split writes them.", rich_help_panel="Split GGUF"),
        split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", metavar="N", min=1, help="GGUF in shards of at most N tensors each (with --split-max-size: whichever comes first).", rich_help_panel="Split GGUF"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan and total size; write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Quantize a model: requantize a GGUF/legacy file, or convert+quantize an HF checkpoint."""

        summary = api.quantize(
            src, out, type=type_name, bits=bits, method=method, format=fmt, pure=pure,
            leave_output_tensor=leave_output, output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type, tensor_types=tensor_type or [],
            allow_requantize=allow_requantize, threads=threads, calib=calib, group_size=group_size,
            act_order=act_order, sym=not asym, damp=damp, nsamples=nsamples, seqlen=seqlen, device=device,
            true_sequential=true_sequential, static_groups=static_groups, mse=mse, scale_rule=scale_rule,
            hessian_reg=hessian_reg, attention_aware=attention_aware, refit_scales=refit_scales, seed=seed, resume=resume, double_quant=double_quant, blocksize=blocksize,
            split_max_size=split_max_size, split_max_tensors=split_max_tensors, imatrix=imatrix,
            include_weights=include_weights or [], exclude_weights=exclude_weights or [],
            target_bpw=target_bpw, target_size=target_size, candidates=candidates, recipe=recipe,
            save_recipe=save_recipe, dry_run=dry_run,
            quiet=quiet or json_out)
        render_quantized(summary, dry_run, quiet, json_out)
