"""bench/pycalls.py --under: the share of perf samples inside a function,
read from ``perf script -F ip,sym`` output (as perf prints it)."""

from __future__ import annotations

from bench.pycalls import perf_stacks, share_under

SCRIPT = """
\t          1af857 pymalloc_alloc (inlined)
\t          1af857 _PyObject_Malloc
\t          f0d52 CPyDef_hub___Hub___deliver+0x312
\t          f0d00 CPyDef_reactor___Reactor___batch+0x12

\t          2bcc91 slot_mp_ass_subscript
\t          f0d52 CPyDef_hub___Hub___deliver+0x40
\t          f0d52 CPyDef_hub___Hub___deliver+0x312
\t          f0d00 CPyDef_reactor___Reactor___batch+0x12

\t          ffffffff8a0 do_syscall_64

"""


def test_shares_of_samples_under_a_symbol() -> None:
    samples = perf_stacks(SCRIPT)
    assert len(samples) == 3
    assert share_under(samples, "CPyDef_hub___Hub___deliver") == 2 / 3  # once per sample
    assert share_under(samples, "slot_mp_ass_subscript") == 1 / 3
    assert share_under(samples, "pymalloc_alloc") == 1 / 3  # an inlined frame counts
    assert share_under(samples, "CPyDef_hub___Hub") == 0  # whole names only
    assert share_under([], "x") == 0
