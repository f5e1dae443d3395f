"""MkDocs hook: the command-line reference, generated from fxprune's Typer app where a page says
``<!-- cli-reference -->`` (every command, argument and option with its help, as ``fxprune COMMAND --help``
prints them, through Typer's own Markdown generator), so the reference cannot fall behind the code."""
from __future__ import annotations

MARKER = "<!-- cli-reference -->"


def reference() -> str:
    import typer.cli  # noqa: PLC0415 - only when a page asks for it
    import typer.main  # noqa: PLC0415
    import typer.models  # noqa: PLC0415

    from fxprune.cli.commands import app  # noqa: PLC0415

    command = typer.main.get_command(app)
    text = typer.cli.get_docs_for_click(obj=command, ctx=typer.models.Context(command), name="fxprune",
                                        title="Reference")
    return "## " + text.replace("\n# ", "\n### ").removeprefix("# ")


def on_page_markdown(markdown: str, **_: object) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
