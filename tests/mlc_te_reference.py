"""MLC-LLM's GroupQuantize._quantize (mlc_llm/quantization/group_quantization.py, pack_weight in
utils.py) restated in TVM tensor expressions for a float16 [rows, k] weight along axis -1, compiled
for the CPU by apache-tvm, and run as a script by tests/test_mlc.py:

    python mlc_te_reference.py ROWS K BITS GROUP weight.npy out.npz
"""
import sys, numpy as np, tvm
from tvm import te, tirx

def mlc_quantize_te(rows, k, bits, group):
    """MLC-LLM's GroupQuantize._quantize for a float16 [rows, k] weight, axis -1, in TVM TE."""
    max_int = tirx.const((1 << (bits - 1)) - 1, "float16")
    per = 32 // bits
    ng = (k + group - 1) // group
    w = te.placeholder((rows, k), "float16", name="w")
    r = te.reduce_axis((0, group), name="r")
    absmax = te.compute((rows, ng), lambda i, g: te.max(tirx.if_then_else(g * group + r < k, te.abs(w[i, g * group + r]), te.min_value("float16")), axis=r))
    scale = te.compute((rows, ng), lambda i, g: absmax[i, g] / max_int, name="scale")
    code = te.compute((rows, k), lambda i, j: tirx.min(tirx.max(tirx.round(w[i, j] / scale[i, j // group] + max_int), tirx.const(0, "float16")), max_int * 2).astype("uint32"))
    ns = ng * (group // per)
    rr = te.reduce_axis((0, per), name="rr")
    packed = te.compute((rows, ns), lambda i, s: te.sum(tirx.if_then_else(s * per + rr < k, code[i, s * per + rr] << (rr * bits).astype("uint32"), tirx.const(0, "uint32")), axis=rr))
    f = tvm.compile(te.create_prim_func([w, packed, scale]), target="llvm")
    return f, ns, ng

rows, k, bits, group = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.load(sys.argv[5]).astype(np.float16)
f, ns, ng = mlc_quantize_te(rows, k, bits, group)
a = tvm.runtime.tensor(x); p = tvm.runtime.tensor(np.zeros((rows, ns), "uint32")); s = tvm.runtime.tensor(np.zeros((rows, ng), "float16"))
f(a, p, s)
np.savez(sys.argv[6], q_weight=p.numpy(), q_scale=s.numpy())
