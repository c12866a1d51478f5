"""Build hook: ship ``_st_peft_import_hint.pth`` into site-packages (see ``_st_peft_import_hint.py``).

Everything else about the package is declared in ``setup.cfg``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HINT_PTH = "_st_peft_import_hint.pth"


class BuildPyWithImportHint(build_py):
    """``build_py`` that also places the start-up ``.pth`` file at the root of the wheel.

    An editable wheel is assembled from the ``install`` command's directory rather than
    ``build_lib``, so that is where the file goes in editable mode.
    """

    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(HINT_PTH, str(Path(root, HINT_PTH)), preserve_mode=0)


setup(cmdclass={"build_py": BuildPyWithImportHint})
