"""What the launchers promise about where and how a kernel runs: every offset into a tensor in
int64, and every launch (and timing) on the inputs' device.

int64: Triton computes products of int32 values in int32 and wraps silently, in the interpreter
as on a GPU. The kernels build offsets only with `kernels.tiles.offset` and `pixel_coords`, tested
here directly, and run end to end on views whose offsets pass 2**31: views into a sparse
memory-mapped file, so that only the few pages the kernels touch ever exist.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import backward, forward, launch, tiles
from helpers import DEVICE, make_problem, to

REPO = Path(__file__).resolve().parents[1]
interpreter_only = pytest.mark.skipif(not launch.INTERPRETING, reason="drives the kernels on CPU tensors")


@triton.jit
def _index_helpers_kernel(index_ptr, stride, pid_ptr, N, H_out, W_out, offset_ptr, n_ptr, pix_ptr, oh_ptr, ow_ptr,
                          mask_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(offset_ptr + i, tiles.offset(tl.load(index_ptr + i), stride, True))
    n, pix, oh, ow, inside = tiles.pixel_tile(tl.load(pid_ptr), N, H_out, W_out, BLOCK, 1, 1)
    tl.store(n_ptr + i, n)
    tl.store(pix_ptr + i, pix)
    tl.store(oh_ptr + i, oh)
    tl.store(ow_ptr + i, ow)
    tl.store(mask_ptr + i, inside.to(tl.int32))


@interpreter_only
@pytest.mark.parametrize("pid", [3, 2**28 + 3], ids=["spanning-samples", "past-2**31-pixels"])
def test_index_helpers_are_exact_past_2_31(pid):
    """`offset` (WIDE) is exact where int32 would wrap; `pixel_tile` finds each pixel of a tile of
    the flattened batch (which may span samples, and start past pixel 2**31) its sample (int64),
    its index, row and column in the sample, and whether it is inside the batch."""
    index = torch.tensor([0, 1, 3, 5, 7, 1000, 2047, 65535], dtype=torch.int32)
    stride, (h_out, w_out) = 2**30 + 3, (5, 3)
    batch = 2 if pid == 3 else 2**28  # the first: pixels 24..31 of 2 samples of 15, the last 2 past the batch
    out = [torch.empty(8, dtype=torch.int64) for _ in range(2)] + [torch.empty(8, dtype=torch.int32) for _ in range(4)]
    _index_helpers_kernel[(1,)](index, stride, torch.tensor([pid], dtype=torch.int32), batch, h_out, w_out, *out,
                                BLOCK=8)
    assert out[0].tolist() == [i * stride for i in index.tolist()]
    flat = [pid * 8 + i for i in range(8)]
    pixels = [p % (h_out * w_out) for p in flat]
    assert out[1].tolist() == [p // (h_out * w_out) for p in flat]
    assert out[2].tolist() == pixels
    assert out[3].tolist() == [p // w_out for p in pixels] and out[4].tolist() == [p % w_out for p in pixels]
    assert out[5].tolist() == [int(p < batch * h_out * w_out) for p in flat]
    if pid == 3:
        assert out[1].tolist() == [1] * 6 + [2] * 2 and out[5].tolist() == [1] * 6 + [0] * 2


LARGE_OFFSETS = textwrap.dedent("""
    import os, sys, tempfile
    import torch
    import kernels
    from atomconv.reference import atom_conv2d_reference, atom_conv2d_reference_backward
    from atomconv.validation import validate_atom_conv2d

    def sparse_view(shape, strides, directory):
        # A view of a sparse file: only the pages the test and the kernels touch take memory.
        numel = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
        path = os.path.join(directory, f"t{len(os.listdir(directory))}")
        with open(path, "wb") as f:
            f.truncate(numel * 4)
        return torch.from_file(path, shared=True, size=numel, dtype=torch.float32).as_strided(shape, strides)

    g = torch.Generator().manual_seed(0)
    n, c_in, c_out, (h, w), m, num_bases = 2, 3, 4, (5, 6), 2, 6
    with tempfile.TemporaryDirectory() as tmp:
        # x: sample 1 starts 2**31 + 8 elements in; β: channel m*L + l starts (m*L + l) * 2**29 in.
        x = sparse_view((n, c_in, h, w), (2**31 + 8, h * w, w, 1), tmp)
        beta = sparse_view((n, m * num_bases, h, w), (h * w, 2**29, w, 1), tmp)
        x.copy_(torch.randn(x.shape, generator=g))
        beta.copy_(torch.randn(beta.shape, generator=g))
        bases, weight = torch.randn(num_bases, 3, 3, generator=g), torch.randn(c_out, c_in, m, generator=g)
        bias, grad_y = torch.randn(c_out, generator=g), torch.randn(n, c_out, h, w, generator=g)
        geo = validate_atom_conv2d(x, beta, bases, weight, bias, 1, 1, 1, 1)
        compact = [t.double().contiguous() for t in (x, beta, bases, weight)]
        expected_y = atom_conv2d_reference(*compact, bias.double(), geo)
        expected = atom_conv2d_reference_backward(grad_y.double(), *compact, geo, (True, True, True, True))
        y = kernels.atom_conv2d_forward(x, beta, bases, weight, bias, 1, 1, 1, 1)
        grads = kernels.atom_conv2d_backward(grad_y, x, beta, bases, weight, 1, 1, 1, 1)
        for name, got, want in zip(["y", "dx", "dbeta", "dbases", "dweight"], [y, *grads], [expected_y, *expected]):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    print("ok")
""")


def test_wide_offsets_count_the_whole_batch():
    """Offsets run from a tensor's start (a pixel tile may span samples): a batch of small samples
    whose extent passes 2**31 elements needs int64 offsets, one just under does not."""
    assert launch.needs_wide_offsets(torch.empty(2**15 + 1, 1, 256, 256, device="meta"))
    assert not launch.needs_wide_offsets(torch.empty(2**14, 1, 256, 256, device="meta"))


@interpreter_only
def test_kernels_read_views_whose_offsets_pass_2_31():
    """End to end, in a subprocess (a wrapped int32 offset reads outside the mapping: a crash)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", LARGE_OFFSETS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-3000:])


# --- every launch and every timing on the inputs' device --------------------------------------

@pytest.fixture
def guarded_launches(monkeypatch):
    """Replace `launch.on_device_of` by a recorder and every kernel by a wrapper that notes, at
    each launch, the device of the guard it runs under (None outside any guard)."""
    current, seen = [], []

    @contextlib.contextmanager
    def recording_guard(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(launch, "on_device_of", recording_guard)
    for module, name in ((forward, "atom_conv2d_fwd_kernel"), (backward, "atom_conv2d_bwd_coeff_kernel"),
                         (backward, "atom_conv2d_bwd_weight_kernel"), (backward, "atom_conv2d_bwd_input_kernel")):
        kernel = getattr(module, name)

        class Recording:
            def __getitem__(self, grid, kernel=kernel, name=name):
                seen.append((name, current[-1] if current else None))
                return kernel[grid]

        monkeypatch.setattr(module, name, Recording())
    return seen


@pytest.mark.skipif(DEVICE == "cpu" and not launch.INTERPRETING, reason="needs a GPU or Triton's interpreter")
def test_every_kernel_launches_under_a_guard_for_its_inputs_device(guarded_launches):
    tensors, kwargs = make_problem(1, 3, 4, (5, 6), 3, padding=1)
    x, atom_coeff, bases, weight, bias = to(tensors, torch.float32)
    kernels.atom_conv2d_forward(x, atom_coeff, bases, weight, bias, **kwargs)
    kernels.atom_conv2d_backward(torch.randn(1, 4, 5, 6, device=DEVICE), x, atom_coeff, bases, weight, **kwargs)
    assert sorted(name for name, _ in guarded_launches) == sorted(
        ["atom_conv2d_fwd_kernel", "atom_conv2d_bwd_coeff_kernel", "atom_conv2d_bwd_weight_kernel",
         "atom_conv2d_bwd_input_kernel"])
    assert {device for _, device in guarded_launches} == {x.device}


def test_tuning_times_under_a_guard_for_the_inputs_device(monkeypatch):
    """The benchmark the cache runs (do_bench) is timed on the inputs' device too."""
    from kernels import configs

    devices = []

    @contextlib.contextmanager
    def recording_guard(t):
        devices.append(t.device)
        yield

    timed = []
    monkeypatch.setattr(configs, "on_device_of", recording_guard)
    monkeypatch.setattr(configs.autotune_cache, "time_launch", lambda run: timed.append(list(devices)) or 1.0)
    monkeypatch.setattr(configs.autotune_cache, "get_config",
                        lambda kernel, *, benchmark, candidates, default, **_: benchmark(default) and default)
    tensors, kwargs = make_problem(1, 3, 4, (5, 6), 3, padding=1)
    x = tensors[0]
    from atomconv.validation import validate_atom_conv2d

    geo = validate_atom_conv2d(*tensors, **kwargs)
    default = configs.default_config()
    assert configs.tuned_config("atom_conv2d_fwd", x.float(), geo, [default], default, run=lambda c: None) == default
    assert timed == [[x.device]]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_second_device_while_the_first_is_current():
    from test_kernels_forward import assert_close, reference

    tensors, kwargs = make_problem(2, 5, 6, (9, 8), 3, padding=1)
    inputs = tuple(t.to("cuda:1", torch.float32) for t in tensors)
    with torch.cuda.device(0):
        y = kernels.atom_conv2d_forward(*inputs, **kwargs)
        grads = kernels.atom_conv2d_backward(torch.ones_like(y), *inputs[:4], **kwargs)
    assert y.device == torch.device("cuda:1") and all(g.device == y.device for g in grads)
    assert_close(y, reference(inputs, kwargs), torch.float32)


@pytest.mark.parametrize("shape, sliced, expected", [
    ((2, 3, 7, 5), False, 1),   # 35 pixels: no run longer than one is safe to hint
    ((2, 3, 6, 3), False, 2),
    ((2, 3, 4, 3), False, 4),
    ((2, 3, 56, 56), False, 8),  # 3136 = 8 * 392: capped at 8
    ((2, 3, 1, 12), False, 4),
    ((2, 3, 8, 8), True, 0),     # rows of a wider tensor: the pixels are not one run
])
def test_pixel_run_divides_the_pixel_count(shape, sliced, expected):
    """The kernels tell Triton that H*W is a multiple of `pixel_run` (so masks are constant over
    such runs): a value that does not divide H*W would let a wide access cross the last pixel."""
    t = torch.empty(*shape[:3], 2 * shape[3])[..., : shape[3]] if sliced else torch.empty(shape)
    run = launch.pixel_run(t)
    assert run == expected
    if run:
        assert (shape[2] * shape[3]) % run == 0


@pytest.mark.parametrize("kernel, kernel_size, num_atoms, dtype, by_rows", [
    ("atom_conv2d_fwd", 3, 6, torch.float16, True),
    ("atom_conv2d_fwd", 7, 6, torch.float32, True),     # row passes
    ("atom_conv2d_fwd", 7, 12, torch.float16, False),   # a row of 84 atoms: tap groups
    ("atom_conv2d_bwd_weight", 3, 6, torch.bfloat16, True),
    ("atom_conv2d_bwd_weight", 3, 6, torch.float32, False),
    ("atom_conv2d_bwd_weight", 5, 6, torch.float16, False),  # tap groups
    ("atom_conv2d_bwd_input", 3, 6, torch.float16, False),
    ("atom_conv2d_bwd_input", 5, 6, torch.float16, True),   # row passes of 30 atoms
    ("atom_conv2d_bwd_input", 7, 6, torch.float16, False),  # row passes of 42
    ("atom_conv2d_bwd_coeff", 3, 6, torch.float16, False),
])
def test_bases_padded_only_for_kernels_that_read_them_by_rows(kernel, kernel_size, num_atoms, dtype, by_rows):
    """A launcher decides once whether its kernel reads Ψ a row at a time (ROWS_OF_PSI) and pads
    Ψ's rows (`launch.row_padded_bases`, a torch copy) only then: elsewhere the kernel gets the
    caller's Ψ."""
    from kernels import configs
    from perf import static_report
    problem = dict(static_report.problem_at(kernel_size), num_atoms=num_atoms)
    run = static_report.kernel_launch(kernel, problem, dtype, configs.default_config())
    bases = run.args["bases_ptr"]
    assert run.args.get("ROWS_OF_PSI", False) == by_rows
    assert bases.shape[1:] == (kernel_size, kernel_size)
    expected_row_stride = max(launch.BASES_ROW_STRIDE, 1 << (kernel_size - 1).bit_length()) if by_rows else kernel_size
    assert (run.args["stride_bases_h"], run.args["stride_bases_w"]) == (bases.stride(1), bases.stride(2)) \
        == (expected_row_stride, 1)


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (5, 3), (7, 7), (3, 17)])
def test_row_padded_bases_hold_a_whole_power_of_two_row(kernel_size):
    """`tiles.basis_row` reads KW rounded up to a power of two values of each row of Ψ in one
    vector load: the launchers' copy must hold Ψ itself, and rows that far apart, starting on a
    multiple of 16 elements (what Triton needs to know to vectorise), with the last row's read
    inside the allocation."""
    kh, kw = kernel_size
    bases = torch.randn(4, kh, kw, dtype=torch.float16)
    padded = launch.row_padded_bases(bases.transpose(1, 2).contiguous().transpose(1, 2))  # (any strides in)
    assert torch.equal(padded, bases)
    width = 1 << (kw - 1).bit_length()
    assert padded.stride(2) == 1 and padded.stride(1) % 16 == 0 and padded.stride(1) >= width
    assert padded.stride(0) == kh * padded.stride(1)
    last_read = padded.storage_offset() + (3 * kh + kh - 1) * padded.stride(1) + width
    assert last_read <= padded.untyped_storage().nbytes() // padded.element_size()
