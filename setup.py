"""Build hooks that pyproject.toml cannot express: put `dlm_lm_eval.pth` at the root of the wheel, regular and
editable, so that site-packages runs it at start-up and plain `lm_eval --model dlm` works (trainers/lm_eval_hook.py).

Its one line finds the installed `trainers` folder without importing the package, loads `lm_eval_hook.py` from it as
the module `dlm_lm_eval_hook` and calls its `install()`; when no `trainers` is found, or the hook is loaded already
(site-packages reached twice through a lib64 -> lib link), it does nothing."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel


PTH = "dlm_lm_eval.pth"
PTH_LINE = (
    "import os, sys, importlib.util as u; s = 'dlm_lm_eval_hook' not in sys.modules and u.find_spec('trainers'); "
    "h = s and s.submodule_search_locations and u.spec_from_file_location('dlm_lm_eval_hook', "
    "os.path.join(s.submodule_search_locations[0], 'lm_eval_hook.py')); m = h and u.module_from_spec(h); "
    "m and (sys.modules.setdefault('dlm_lm_eval_hook', m), h.loader.exec_module(m), m.install())\n"
)


def write_pth(folder: str) -> str:
    path = os.path.join(folder, PTH)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(PTH_LINE)
    return path


class BuildPyWithPth(build_py):
    """A regular wheel: the .pth goes next to the packages in build_lib, hence to the root of site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            os.makedirs(self.build_lib, exist_ok=True)
            write_pth(self.build_lib)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """An editable wheel (`pip install -e`): setuptools links the packages but adds no extra root file, so the .pth
    goes into the unpacked wheel, whose files are written to the wheel's root as they are."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        write_pth(str(unpacked_wheel))
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
