"""Ahead-of-time compile of every OHEM kernel configuration the launchers use, for sm_80 and sm_90: those
of ``kernels/ohem_ce.py`` (forward, select pass, backward) and of the fused-upsampling variant in
``kernels/ohem_ce_upsampled.py``.

Fails on a compile error, a shared-memory overflow or a register spill (docs/DESIGN.md section 7), and
on a hot loop that lost its vectorised global loads (issue 14.3); prints registers, spills and whether
the global loads were vectorised (pytest -s shows the table). The tables of what the launchers compile
live here, not in ``kernels/`` (which imports nothing from ``ifbf_fast``).
"""
import dataclasses
import re

import pytest
import torch

from ifbf_fast.kernels import ohem_ce as K
from ifbf_fast.kernels import ohem_ce_select as S
from ifbf_fast.kernels import ohem_ce_upsampled as KU
from ifbf_fast.utils.triton_aot import KernelSpec, assert_compiles_cleanly, compile_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (classes, channels_last): the project's 19 classes in both layouts, and the smallest and largest
# class blocks the launcher uses (BLOCK_C = 2 with 1024-pixel tiles, BLOCK_C = 256 with 16).
CLASS_CONFIGS = ((19, False), (19, True), (1, False), (K.MAX_BLOCK_C, False))
TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
            torch.int32: "i32", torch.uint8: "u8", torch.int16: "i16", torch.int8: "i8"}


def kernel_specs(num_classes, logits_dtype, target_dtype=torch.int64, channels_last=False, aligned=True):
    """The forward and backward launches for one input kind: dense NCHW or channels_last (the unit stride
    specialised to 1 as a real launch does); ``aligned`` marks what a real launch at 876 x 876 marks
    divisible by 16 (pointers, H*W, the batch strides and the class stride of NCHW)."""
    block_p, block_c, warps = K.block_sizes(num_classes)
    lt, tt = TL_TYPES[logits_dtype], TL_TYPES[target_dtype]
    unit = "stride_lc" if channels_last else "stride_lw"
    common = {"C": "i32", "HW": "i32", "W": "i32", "stride_ln": "i32", "stride_lc": "i32", "stride_lh": "i32",
              "stride_lw": "i32", "stride_tn": "i32", "stride_th": "i32", "stride_tw": "constexpr",
              unit: "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr", "FLAT_HW": "constexpr",
              "PACKED_C": "constexpr"}
    # channels_last logits of more than one class are packed (kernels/ohem_ce.py _packed_classes)
    consts = {"stride_tw": 1, unit: 1, "BLOCK_P": block_p, "BLOCK_C": block_c, "FLAT_HW": True,
              "PACKED_C": num_classes if channels_last and num_classes > 1 else 0}
    div = ["logits_ptr", "target_ptr", "HW", "stride_ln", "stride_tn"] + ([] if channels_last else ["stride_lc"])
    fwd_sig = dict(common, logits_ptr=f"*{lt}", target_ptr=f"*{tt}", loss_ptr="*fp32", scratch_ptr="*i32",
                   ignore_index="i32", keep_hi="i32", keep_lo="i32", n_programs="i32",
                   TILES="constexpr")
    gunit = "stride_gc" if channels_last else "stride_gw"
    bwd_sig = dict(common, grad_out_ptr="*fp32", logits_ptr=f"*{lt}", target_ptr=f"*{tt}", loss_ptr="*fp32",
                   state_ptr="*i32", grad_ptr=f"*{lt}", stride_gn="i32", stride_gc="i32", stride_gh="i32",
                   stride_gw="i32")
    bwd_sig[gunit] = "constexpr"
    mod = K.__name__
    return [
        KernelSpec(mod, "_ohem_ce_fwd_kernel", fwd_sig, dict(consts, TILES=K.FWD_TILES),
                   divisible_by_16=tuple(div + ["loss_ptr", "scratch_ptr"]) if aligned else (), num_warps=warps),
        KernelSpec(mod, "_ohem_ce_bwd_kernel", bwd_sig, dict(consts, **{gunit: 1}),
                   divisible_by_16=tuple(div + ["loss_ptr", "state_ptr", "grad_ptr", "grad_out_ptr", "stride_gn"]
                                         + ([] if channels_last else ["stride_gc"])) if aligned else (),
                   num_warps=warps),
    ]


def select_kernel_specs():
    sig = {"loss_ptr": "*fp32", "scratch_ptr": "*i32", "partial_ptr": "*fp64", "state_ptr": "*i32",
           "result_ptr": "*fp32", "bad_ptr": "*fp32", "P": "i32", "keep_hi": "i32", "keep_lo": "i32",
           "thresh_bits": "i32", "zero_steps": "i32", "BLOCK": "constexpr"}
    return [KernelSpec(S.__name__, "_ohem_ce_select_kernel", sig, {"BLOCK": S.RED_BLOCK},
                       divisible_by_16=("loss_ptr", "scratch_ptr", "partial_ptr", "state_ptr", "result_ptr",
                                        "bad_ptr", "P"), num_warps=8)]


def upsample_kernel_specs(num_classes, logits_dtype, size_in=(219, 219), size_out=(876, 876), channels_last=False,
                          target_dtype=torch.uint8, arch=90):
    block_p, block_c, warps = K.block_sizes(num_classes)
    lt, tt = TL_TYPES[logits_dtype], TL_TYPES[target_dtype]
    unit = "stride_lc" if channels_last else "stride_lw"
    common = {"lr_ptr": f"*{lt}", "target_ptr": f"*{tt}", "loss_ptr": "*fp32", "C": "i32", "W": "i32",
              "h_in": "i32", "w_in": "i32", "scale_h": "fp32", "scale_w": "fp32", "stride_ln": "i32",
              "stride_lc": "i32", "stride_lh": "i32", "stride_lw": "i32", "stride_tn": "i32", "stride_th": "i32",
              "stride_tw": "constexpr", unit: "constexpr", "BLOCK_C": "constexpr"}
    consts = {"stride_tw": 1, unit: 1}
    div = ("lr_ptr", "target_ptr", "loss_ptr", "stride_ln", "stride_tn")
    mma = KU.forward_mma(size_in, size_out, num_classes, logits_dtype)     # as a launch at these sizes
    fwd = KernelSpec(KU.__name__, "_ohem_ce_up_fwd_kernel",
                     dict(common, scratch_ptr="*i32", HW="i32", ignore_index="i32", keep_hi="i32", keep_lo="i32",
                          n_programs="i32", BLOCK_P="constexpr", TILES="constexpr",
                          FLAT_HW="constexpr", **{k: "constexpr" for k in mma}),
                     dict(consts, BLOCK_P=block_p, BLOCK_C=block_c, TILES=K.FWD_TILES, FLAT_HW=True, **mma),
                     divisible_by_16=div + ("scratch_ptr", "HW"), num_warps=2 * warps)
    # the backward as ohem_ce_up_bwd picks it: the x4 kernel (exact x4 of fp16 / bf16), else the gather
    x4 = KU.backward_x4(size_in, size_out, num_classes, logits_dtype, arch)
    launch = dict(x4) if x4 is not None else KU.backward_launch(size_in, size_out, num_classes)
    warps_b, maxnreg = launch.pop("num_warps"), launch.pop("maxnreg", None)
    gunit = "stride_gc" if channels_last else "stride_gw"
    bwd_sig = dict(common, grad_out_ptr="*fp32", state_ptr="*i32", glr_ptr=f"*{lt}", H="i32", stride_gn="i32",
                   stride_gc="i32", stride_gh="i32", stride_gw="i32", **{k: "constexpr" for k in launch})
    if x4 is None:
        bwd_sig.update(inv_scale_h="fp32", inv_scale_w="fp32")
    else:
        del bwd_sig["scale_h"]
    bwd_sig[gunit] = "constexpr"
    name = "_ohem_ce_up_bwd_x4_kernel" if x4 is not None else "_ohem_ce_up_bwd_kernel"
    bwd = KernelSpec(KU.__name__, name, bwd_sig, dict(consts, **launch, **{gunit: 1}),
                     divisible_by_16=div + ("grad_out_ptr", "state_ptr", "glr_ptr", "stride_gn"), num_warps=warps_b,
                     maxnreg=maxnreg)
    return [fwd, bwd]


def _all_specs():
    specs = []
    for dtype in DTYPES:
        for classes, channels_last in CLASS_CONFIGS:
            specs += kernel_specs(classes, dtype, channels_last=channels_last)
    for target_dtype in (torch.int32, torch.uint8):         # labels as the loader hands them over
        specs += kernel_specs(19, torch.bfloat16, target_dtype)
    specs += kernel_specs(19, torch.float32, aligned=False)
    for dtype in DTYPES:                                      # the fused x4 upsampling
        specs += upsample_kernel_specs(19, dtype)
    specs += upsample_kernel_specs(19, torch.bfloat16, channels_last=True, target_dtype=torch.int64)
    specs += upsample_kernel_specs(19, torch.bfloat16, (256, 512), (1024, 2048))
    for classes in (12, 40):                                  # the x4 backward's 16- and 64-lane class blocks
        specs += upsample_kernel_specs(classes, torch.bfloat16)[1:]
    specs += upsample_kernel_specs(19, torch.bfloat16, (4, 4), (13, 17))[1:]
    specs += upsample_kernel_specs(19, torch.bfloat16, (3, 5), (100, 170))[1:]   # large factor: 64-wide windows
    return specs + select_kernel_specs()


def test_every_launched_configuration_compiles_cleanly_for_sm80_and_sm90():
    specs = _all_specs()
    results = compile_kernels(specs)
    rows = []
    for spec, per_arch in zip(specs, results):
        assert [r.arch for r in per_arch] == [80, 90]
        for r in per_arch:
            assert f".entry {spec.attr}" in r.ptx
            rows.append(f"{spec.attr:28s} {str(spec.signature.get('logits_ptr', spec.signature.get('lr_ptr', '-'))):6s} "
                        f"BLOCK_C={spec.constexprs.get('BLOCK_C', '-')!s:4s} "
                        f"unit={'c' if spec.constexprs.get('stride_lc') == 1 else 'w'} sm_{r.arch} "
                        f"regs={r.registers:3d} spills={r.spills} smem={r.shared} vec={r.vector_loads}")
        assert_compiles_cleanly(per_arch)
    print("\n" + "\n".join(rows))
    # 19 classes, NCHW and packed channels_last, aligned as at 876 x 876: the forward's and the backward's
    # logits loads (the backward's are not masked by the kept flag) and the select pass's loss loads must
    # vectorise, and so must the backward's gradient stores.
    for spec, per_arch in zip(specs, results):
        hot = (spec.attr in ("_ohem_ce_fwd_kernel", "_ohem_ce_bwd_kernel") and spec.constexprs.get("BLOCK_C") == 32
               and 1 in (spec.constexprs.get("stride_lw"), spec.constexprs.get("stride_lc")) and spec.divisible_by_16)
        if hot or spec.attr == "_ohem_ce_select_kernel":
            assert all(r.vector_loads for r in per_arch), f"{spec.attr} {spec.signature.get('logits_ptr')}: scalar loads"
        if hot and spec.attr == "_ohem_ce_bwd_kernel":
            assert all(re.search(r"st\.global(\.\w+)*\.v[24]", r.ptx) for r in per_arch), \
                f"{spec.attr} {spec.signature.get('logits_ptr')}: scalar gradient stores"


def test_integer_arguments_of_one_compile():
    """On a GPU, Triton turns an integer argument equal to 1 (a batch of one, one row, a unit stride) into a
    compile-time constant, a plain Python int inside the kernel; a tensor method on it would not compile
    (seen in the FBF kernels on an H200). Compile each kernel with each integer argument set to 1."""
    base = (kernel_specs(19, torch.float32) + upsample_kernel_specs(19, torch.float32)
            + upsample_kernel_specs(19, torch.bfloat16)[1:] + select_kernel_specs())      # [1:]: the x4 backward
    specs, names = [], []
    seen = set()
    for spec in base:
        for arg, kind in spec.signature.items():
            if kind not in ("i32", "i64") or (spec.attr, arg) in seen:
                continue
            seen.add((spec.attr, arg))
            sig, const = dict(spec.signature), dict(spec.constexprs)
            sig[arg], const[arg] = "constexpr", 1
            div = tuple(a for a in spec.divisible_by_16 if a != arg)
            specs.append(dataclasses.replace(spec, signature=sig, constexprs=const, divisible_by_16=div))
            names.append(f"{spec.attr} {arg}=1")
    assert len(specs) > 10
    results = compile_kernels(specs, archs=(90,))
    for name, spec, per_arch in zip(names, specs, results):
        assert per_arch and f".entry {spec.attr}" in per_arch[0].ptx, name


def test_hot_kernels_keep_enough_bytes_in_flight_on_an_h200():
    """Little's law from the compiled code (ifbf_fast.utils.sass): the forward and backward at
    4 x 19 x 876^2 in both layouts, the DRAM-bound passes over the logits, keep at least the H200's share
    of 3 MB per SM in flight: resident blocks (ptxas registers, shared memory, the H200 grid) x threads x the 16-byte
    loads each thread issues before it uses the first (SASS). The select pass over the 12 MB loss buffer
    is held to it too (it ran one block per SM at 149 registers until its second histogram was chunked:
    16 KiB per SM), and so are channels_last logits (packed pixel rows: flat loads regrouped by a
    gather; strided [pixels, classes] tiles of 38- or 76-byte rows gave scalar loads, 0 in flight)."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    shape = (4, 19, 876, 876)
    logits = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    target = torch.empty(4, 876, 876, device="meta", dtype=torch.uint8)
    fwd_grid, bwd_grid = K._fwd_meta(logits, target)[1], K.bwd_grid(shape)
    cases = []
    for dtype in DTYPES:
        for channels_last in (False, True):
            fwd, bwd = kernel_specs(19, dtype, channels_last=channels_last)
            cases += [(f"fwd {dtype} {'cl' if channels_last else 'nchw'}", fwd, fwd_grid),
                      (f"bwd {dtype} {'cl' if channels_last else 'nchw'}", bwd, bwd_grid)]
    cases.append(("select", select_kernel_specs()[0], (-(-shape[0] * shape[2] * shape[3] // S.RED_BLOCK),)))
    results = compile_kernels([dataclasses.replace(spec, sass_archs=(90,)) for _, spec, _ in cases], archs=(90,))
    need = sass.H200_BYTES_IN_FLIGHT // sass.H200_SMS
    lines, short = [], []
    for (name, _, grid), (r,) in zip(cases, results):
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
        got = sass.bytes_in_flight_per_sm(r.num_warps, r.registers, r.loads_in_flight, programs, r.shared)
        lines.append(f"{name:28s} regs {r.registers:3d} warps {r.num_warps} smem {r.shared:6d} loads in flight "
                     f"{r.loads_in_flight} programs {programs:6d}: {got / 1024:5.1f} KiB per SM")
        if got < need:
            short.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert not short, f"below {need / 1024:.1f} KiB per SM:\n" + "\n".join(short)


def test_fused_backward_issues_few_instructions_per_output_pixel():
    """The fused-upsampling backward at 4 x 19 x 219^2 -> 876^2 in fp16 / bf16, both layouts: warp-wide
    instructions per output pixel of its window loop, from the sm_90 SASS (the loop body's length x
    warps / the pixels of one step). The gather backward (fp32 logits keep it) re-gathered each step's
    four corners per class lane and applied the transposed interpolation as a dense fp32 matmul onto
    all 64 owned pixels: about 210 per pixel, 0.8-1.7 ms of instruction issue at the network's shape.
    The x4 kernel reuses loop-invariant weights, recomputes the logits as a tensor-core matmul and
    scatters onto the two owned rows a step reaches, also on the tensor cores; its register cap
    (``X4_MAXNREG``) keeps two 8-warp blocks per SM without spills. 36 per pixel with the gradient's
    two bf16 pieces along K of the scatter ([C, 2 P] @ [2 P, 32], mma.sync fed by register shuffles)
    and a select per element for the padded classes and the pixels not kept; 26-27 with Triton 3.8
    and 3.6 since (pieces along M: one wgmma, -inf padding from the window, kept folded into the
    coefficient). Its figure and the gather's are printed."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    cases = [(f"{dtype} {'cl' if cl else 'nchw'}", upsample_kernel_specs(19, dtype, channels_last=cl)[1])
             for dtype in (torch.bfloat16, torch.float16, torch.float32) for cl in (False, True)]
    results = compile_kernels([dataclasses.replace(spec, sass_archs=(90,)) for _, spec in cases], archs=(90,))
    lines, slow = [], []
    for (name, spec), (r,) in zip(cases, results):
        x4 = spec.attr == "_ohem_ce_up_bwd_x4_kernel"
        assert x4 == (spec.signature["lr_ptr"] != "*fp32"), name
        (body,) = sass.loop_bodies(r.sass)
        pixels = 4 * 4 * (spec.constexprs["OT"] + 1) if x4 else spec.constexprs["CH"] * spec.constexprs["WIN_W"]
        per_pixel = len(body) * r.num_warps / pixels
        lines.append(f"{name:22s} {spec.attr:26s} regs {r.registers:3d} loop {len(body):4d} instructions / "
                     f"{pixels} pixels: {per_pixel:5.1f} warp instructions per output pixel")
        if x4:
            assert r.spills == 0 and r.registers <= spec.maxnreg, lines[-1]
            assert sass.resident_blocks(r.num_warps, r.registers, r.shared) >= 2, lines[-1]
            if per_pixel > 29:
                slow.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert not slow, "\n".join(slow)


def _tile_loop(sass_text):
    """The forward's tile loop in SASS text: the loop that stores (the per-pixel losses); the last
    program's epilogue has a loop of its own (the exponent scan of ohem_ce_select), which loads only."""
    from ifbf_fast.utils import sass
    (body,) = [b for b in sass.loop_bodies(sass_text) if any(re.search(r"\bSTG\b", t) for t in b)]
    return body


def test_fused_forward_issues_few_instructions_per_output_pixel():
    """The fused-upsampling forward at 4 x 19 x 219^2 -> 876^2 in fp16 / bf16, both layouts: warp-wide
    instructions per output pixel of its tile loop, from the sm_90 SASS (the loop body's length x warps
    / BLOCK_P). It is bound by instruction issue (3.1 M output pixels x 43 = 0.13 G warp instructions,
    0.13-0.25 ms at four or two per SM and clock, against 23 MB of DRAM traffic: 5.4 us); 43 per
    pixel before its tiles were aligned to the x4 pattern (weights computed per tile), its exp took
    ex2 without .ftz (a range check around each MUFU), its log was a software polynomial, its counts
    were summed per tile (two barriers each) and it built a 256-bin exponent histogram per tile
    (Triton 3.6 lowers tl.histogram to ballots and popcounts: 53.6 per pixel there); 19.3-20 now with
    Triton 3.6 and 3.8 (the padded classes' -inf comes out of the matmul: a padding row of the
    window). The gather's figure (fp32 logits keep it) is printed beside."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    cases = [(f"{dtype} {'cl' if cl else 'nchw'}", upsample_kernel_specs(19, dtype, channels_last=cl)[0])
             for dtype in (torch.bfloat16, torch.float16, torch.float32) for cl in (False, True)]
    results = compile_kernels([dataclasses.replace(spec, sass_archs=(90,)) for _, spec in cases], archs=(90,))
    lines, slow = [], []
    for (name, spec), (r,) in zip(cases, results):
        body = _tile_loop(r.sass)
        per_pixel = len(body) * r.num_warps / spec.constexprs["BLOCK_P"]
        lines.append(f"{name:22s} MMA={spec.constexprs['MMA']!s:5s} regs {r.registers:3d} loop {len(body):4d} "
                     f"instructions: {per_pixel:5.1f} warp instructions per output pixel")
        if spec.constexprs["MMA"] and per_pixel > 21:
            slow.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert not slow, "\n".join(slow)


def test_ohem_ce_issues_few_instructions_per_pixel():
    """The full-resolution OHEM kernels at 4 x 19 x 876^2, fp32 / fp16 / bf16 logits, both layouts:
    warp-wide instructions per pixel from the sm_90 SASS, the forward's tile loop and the whole
    backward (one tile per program: no loop) x warps / BLOCK_P. Issue, not DRAM, bounds them at 2-4
    instructions per SM and clock (3.1 M pixels x 49 = 0.15 G warp instructions before: 0.14-0.28
    ms, against 0.08 ms of DRAM traffic for fwd+bwd). The forward took the true-class logit by a
    select and a sum over the classes (a third class reduction: across warps for NCHW tiles, a
    5-level butterfly of shuffles for channels_last ones, whose classes lie along the lanes): 24.5
    NCHW and 46 channels_last, 14.5 and 32 since it loads it (Triton 3.8 and 3.6). The backward took
    the softmax's max and sum over the classes (two more class reductions), a reciprocal and a select
    per element for the pixels not kept: 24.75 NCHW and 50.5 channels_last; 14.5-15 and 25.5-26.5
    since it takes the forward's log-sum-exp (loss + true-class logit, _ohem_ce_grad)."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    bounds = {("fwd", False): 16, ("fwd", True): 34, ("bwd", False): 17, ("bwd", True): 28}
    cases = []
    for dtype in DTYPES:
        for cl in (False, True):
            fwd, bwd = kernel_specs(19, dtype, channels_last=cl)
            cases += [(("fwd", cl), f"fwd {dtype} {'cl' if cl else 'nchw'}", fwd),
                      (("bwd", cl), f"bwd {dtype} {'cl' if cl else 'nchw'}", bwd)]
    results = compile_kernels([dataclasses.replace(spec, sass_archs=(90,)) for _, _, spec in cases], archs=(90,))
    lines, slow = [], []
    for (key, name, spec), (r,) in zip(cases, results):
        code = _tile_loop(r.sass) if key[0] == "fwd" else sass.instructions(r.sass)
        per_pixel = len(code) * r.num_warps / spec.constexprs["BLOCK_P"]
        lines.append(f"{name:28s} regs {r.registers:3d} {len(code):5d} instructions: {per_pixel:5.1f} warp "
                     f"instructions per pixel (bound {bounds[key]})")
        if per_pixel > bounds[key]:
            slow.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert not slow, "\n".join(slow)


def test_fused_forward_issues_few_loads_per_output_pixel():
    """The fused-upsampling forward at 4 x 19 x 219^2 -> 876^2 (the training loss) in fp16 / bf16, both
    layouts: warp-wide global loads per output pixel, from the sm_90 SASS (the LDGs of the tile loop).
    The per-pixel gather of
    four corners issued 4 per pixel (64 2-byte loads per thread per 128-pixel tile at 8 warps: a load-
    issue bound of 23-47 us at the network shape against a 5.4 us DRAM floor); the matmul path reads
    each tile's source window once. The gather's figure (fp32 logits, which keep it) is printed beside."""
    from ifbf_fast.utils import sass
    if not sass.cuobjdump_path():
        pytest.skip("no cuobjdump (it ships with triton under backends/nvidia/bin)")
    cases = [(f"{dtype} {'cl' if cl else 'nchw'}", upsample_kernel_specs(19, dtype, channels_last=cl)[0])
             for dtype in (torch.bfloat16, torch.float16, torch.float32) for cl in (False, True)]
    results = compile_kernels([dataclasses.replace(spec, sass_archs=(90,)) for _, spec in cases], archs=(90,))
    lines = []
    for (name, spec), (r,) in zip(cases, results):
        loads = sum(n for op, n in sass.memory_opcodes("\n".join(f"/*0000*/ {t};" for t in _tile_loop(r.sass))).items()
                    if op.startswith("LDG"))
        per_pixel = loads * r.num_warps / spec.constexprs["BLOCK_P"]
        lines.append(f"{name:22s} MMA={spec.constexprs['MMA']!s:5s} regs {r.registers:3d} LDG per thread per tile "
                     f"{loads:3d}: {per_pixel:.2f} warp loads per output pixel")
        assert spec.constexprs["MMA"] == (spec.signature["lr_ptr"] != "*fp32"), name
        if spec.constexprs["MMA"]:
            assert per_pixel <= 0.5, lines[-1]
    print("\n" + "\n".join(lines))
