"""``.. shell::`` blocks: shown as bash, run by the doctest builder.

The commands of a block run with ``bash -e`` in the doctest scratch directory; a failing command
fails the doctest build, so every shell example in the docs is checked as the Python ones are.
``:group:`` names the doctest group (default ``default``, shared with the page's doctests).
"""
from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

#: Python run (in ``doctest_global_setup``) to define the helper the hidden test calls.
SETUP = r'''
def _kmlip_shell(script):
    import subprocess
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"shell block failed with status {proc.returncode}:\n"
                           + proc.stdout[-3000:] + proc.stderr[-3000:])
'''


class ShellDirective(SphinxDirective):
    has_content = True
    option_spec = {"group": directives.unchanged}

    def run(self):
        text = "\n".join(self.content)
        shown = nodes.literal_block(text, text, language="bash")
        self.set_source_info(shown)
        test = nodes.comment(f"_kmlip_shell({text!r})", f"_kmlip_shell({text!r})")
        test["testnodetype"] = "testcode"
        test["groups"] = [self.options.get("group", "default")]
        test["options"] = {}
        self.set_source_info(test)
        return [shown, test]


def setup(app):
    app.add_directive("shell", ShellDirective)
    return {"parallel_read_safe": True}
