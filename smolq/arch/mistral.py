"""Mistral (MistralForCausalLM): LLaMA's tensors and GGUF architecture `llama`, as llama.cpp writes it.

llama.cpp's converter registers MistralForCausalLM with its LLaMA model: the
same Q/K permutation, keys and tensor names. Its `llama` graph has no sliding
window attention and the converter writes no sliding-window key, so neither
does smolq; a config whose `sliding_window` is shorter than its context gets
a note saying llama.cpp attends over the whole context (the same result up to
that many tokens). No 2023 loader knows Mistral: no legacy containers.
"""
from __future__ import annotations

from smolq.arch.llama import Llama


class Mistral(Llama):
    family = "mistral"
    gguf_arch = "llama"
    hf_architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    legacy_targets = {}
    mlc_model_type = None
    hf_export = False  # a Mistral GGUF is a `llama` file; `--format hf` writes it back as LlamaForCausalLM

    def read_hparams(self) -> None:
        super().read_hparams()
        window = self.config.get("sliding_window")
        if isinstance(window, int) and 0 < window < self.n_ctx:
            self.notes.append(f"sliding_window {window}: llama.cpp's llama architecture attends over the whole "
                              f"context (the same as Mistral's up to {window} tokens); GGUF has no key for it here")
