"""Writes the ``--help`` text of ``kmlip`` and each of its subcommands for the docs.

Run by ``docs/conf.py`` at build time into ``docs/_generated/`` (not in git), so the command-line
page always shows the parser that the installed package actually has.
"""
from __future__ import annotations

import argparse
import os


def write_cli_help(directory: str, width: int = 92) -> list[str]:
    """Writes ``kmlip.txt``, ``kmlip-<command>.txt`` and ``cli_help.rst`` (a section per command
    that includes its text); returns the subcommand names."""
    from kmlip.cli.main import build_parser

    os.makedirs(directory, exist_ok=True)
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal width: fix it
    try:
        parser = build_parser()
        texts = {"kmlip": parser.format_help()}
        commands = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    commands.append(name)
                    texts[f"kmlip-{name}"] = sub.format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    for stem, text in texts.items():
        path = os.path.join(directory, f"{stem}.txt")
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:  # unchanged files keep their time stamp: no needless rebuilds
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
    rst = []
    for stem in texts:
        title = stem.replace("-", " ") + " --help"
        rst += [f"``{title}``", "~" * (len(title) + 4), "",
                f".. literalinclude:: /_generated/{stem}.txt", "   :language: text", ""]
    path = os.path.join(directory, "cli_help.rst")
    text = "\n".join(rst)
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return commands
