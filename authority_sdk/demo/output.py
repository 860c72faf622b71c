"""How the demo looks: one table, printed a row at a time as the steps run."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .steps import Step

__all__ = ["StepTable"]

OK, FAIL = "✔", "✘"


class StepTable:
    """Rows printed as separate tables with the same columns, so they line up like one
    table while each appears the moment its step is done."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def _table(self, header: bool) -> Table:
        t = Table(box=box.SIMPLE_HEAD if header else None, show_header=header, pad_edge=False,
                  show_edge=False, expand=True, padding=(0, 1))
        t.add_column("", width=1, no_wrap=True)
        t.add_column("#", width=2, justify="right", no_wrap=True)
        t.add_column("Step", ratio=1, overflow="fold")
        t.add_column("Outcome", ratio=1, overflow="fold")
        return t

    def header(self) -> None:
        t = self._table(header=True)
        self.console.print(t)

    def row(self, n: int, step: Step) -> None:
        t = self._table(header=False)
        if step.ok:
            mark, got = Text(OK, style="bold green"), Text(step.got, style="green")
        else:
            mark = Text(FAIL, style="bold red")
            got = Text(f"{step.got or 'nothing'} (expected {step.expected})", style="bold red")
        t.add_row(mark, str(n), Text(step.title), got)
        self.console.print(t)
        for note in step.notes:
            # Padded, so a long note wraps under itself rather than under the marks.
            self.console.print(Padding(Text("↳ " + note, style="dim" if step.ok else "red",
                                            overflow="fold"), (0, 0, 0, 6), expand=False))
