"""pyxen.toolstack.xllist: `xl list` output byte for byte (tools/xl/xl_info.c list_domains)."""

from __future__ import annotations

import pytest

from pyxen.toolstack.xllist import (HEADER, ListRow, format_row, format_xl_list,
                                    state_letters)

# xl_info.c: printf("Name                                        ID   Mem VCPUs\tState\tTime(s)");
XL_HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
# xl_info.c row format, with %5lu written as Python's %5d
XL_ROW = "%-40s %5d %5d %5d     %c%c%c%c%c%c  %8.1f"


def test_header_is_xls_literal() -> None:
    assert HEADER == XL_HEADER
    assert HEADER.index("ID") == 44 and HEADER.count("\t") == 2


def test_dom0_row_matches_the_man_page_example() -> None:
    row = ListRow("Domain-0", 0, 750, 4, running=True, cpu_time_s=11794.3)
    assert format_row(row) == ("Domain-0                                     0   750     4"
                               "     r-----   11794.3")


def test_whole_output_header_rows_newlines() -> None:
    rows = [ListRow("Domain-0", 0, 2048, 8, running=True, cpu_time_s=123.4),
            ListRow("debian-pvh", 3, 512, 2, blocked=True, cpu_time_s=7.0),
            ListRow("paused-one", 12, 64, 1, paused=True)]
    assert format_xl_list(rows) == (
        XL_HEADER + "\n"
        + "Domain-0                                     0  2048     8     r-----     123.4\n"
        + "debian-pvh                                   3   512     2     -b----       7.0\n"
        + "paused-one                                  12    64     1     --p---       0.0\n")


def test_rows_follow_the_c_format_string() -> None:
    row = ListRow("guest", 32767, 99999, 128, running=True, blocked=True, paused=True,
                  shutdown=True, shutdown_reason=1, dying=True, cpu_time_s=12345678.96)
    assert format_row(row) == XL_ROW % ("guest", 32767, 99999, 128, *"rbpsrd", 12345678.96)
    assert format_row(row).endswith("     rbpsrd  12345679.0")


def test_long_names_are_not_truncated() -> None:
    name = "n" * 45
    assert format_row(ListRow(name, 1, 1, 1)) == name + "     1     1     1     ------       0.0"


@pytest.mark.parametrize("kwargs,letters", [
    ({}, "------"),
    ({"running": True}, "r-----"),
    ({"blocked": True}, "-b----"),
    ({"paused": True}, "--p---"),
    ({"shutdown": True}, "---s--"),                          # poweroff: reason letter '-'
    ({"shutdown": True, "shutdown_reason": 1}, "---sr-"),    # reboot
    ({"shutdown": True, "shutdown_reason": 2}, "---ss-"),    # suspend
    ({"crashed": True}, "---sc-"),                           # crash implies shutdown
    ({"shutdown": True, "shutdown_reason": 3}, "---sc-"),
    ({"shutdown": True, "shutdown_reason": 4}, "---sw-"),    # watchdog
    ({"shutdown": True, "shutdown_reason": 5}, "---sS-"),    # soft_reset
    ({"shutdown": True, "shutdown_reason": 9}, "---s?-"),    # out of range
    ({"shutdown_reason": 1}, "------"),                      # reason only counts when shut down
    ({"dying": True, "shutdown": True}, "---s-d"),
])
def test_state_letters(kwargs: dict, letters: str) -> None:
    assert state_letters(**kwargs) == letters


def test_cpu_time_from_ns_goes_through_a_c_float() -> None:
    # xl prints (float)cpu_time / 1e9: 10**17 ns is 99999998430674944 as a float32.
    row = ListRow.from_ns("d", 1, 1, 1, 10**17, running=True)
    assert format_row(row).endswith("r-----  99999998.4")
    assert ListRow.from_ns("d", 1, 1, 1, 11_794_300_000_000).cpu_time_s == pytest.approx(11794.3)


def test_long_output_is_a_stub() -> None:
    with pytest.raises(NotImplementedError):
        format_xl_list([], long=True)
