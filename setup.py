"""Ships ``decoding_harness_lm_eval.pth`` at the root of site-packages.

Everything else is in pyproject.toml. The .pth file lets lm-eval 0.4.13, which
has no plugin discovery, find this project's models (decoding_harness_lm_eval.py).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "decoding_harness_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self):
        # Used by editable installs: which built file comes from which source.
        mapping = super().get_output_mapping()
        mapping[os.path.join(self.build_lib, PTH)] = PTH
        return mapping


setup(cmdclass={"build_py": BuildPyWithPth})
