"""Sections that later commands add to a run's report.md."""

import pytest

from shared.data.errors import DataError
from shared.report import write_report_section


def test_a_section_is_appended_once_and_replaced_when_written_again(tmp_path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# fedae run: wdbc\n\n## Plots\n")

    write_report_section(report, "privacy-audit", "## Privacy audit\n\nfirst")
    write_report_section(report, "privacy-audit", "## Privacy audit\n\nsecond")

    text = report.read_text()
    assert text.startswith("# fedae run: wdbc\n\n## Plots\n")
    assert text.count("<!-- fedae:privacy-audit:begin -->") == 1
    assert text.count("<!-- fedae:privacy-audit:end -->") == 1
    assert "second" in text and "first" not in text


def test_a_missing_report_gets_just_the_section_and_a_torn_one_is_refused(tmp_path) -> None:
    report = tmp_path / "report.md"
    write_report_section(report, "privacy-audit", "audit")
    assert (
        report.read_text() == "<!-- fedae:privacy-audit:begin -->\naudit\n<!-- fedae:privacy-audit:end -->\n"
    )
    report.write_text("# run\n\n<!-- fedae:privacy-audit:begin -->\nhalf a section\n")
    with pytest.raises(DataError, match="begin marker but no end marker"):
        write_report_section(report, "privacy-audit", "audit")
