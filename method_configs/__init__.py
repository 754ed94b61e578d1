"""nerfstudio method specifications of nerfstudio-distill: one module per method.

nerfstudio imports this package for *every* ``ns-train``/``ns-export``/``ns-viewer``
(entry point group ``nerfstudio.method_configs`` in ``pyproject.toml``), also for
built-in methods such as ``nerfacto``. So it must stay light and never fail:
- it installs the compatibility layer (:mod:`nerfstudio_distill.compat`);
- it must not import diffusers or transformers (priors import them lazily).

To register a method: add ``method_configs/<name>.py`` defining a
``MethodSpecification`` whose ``config.method_name`` is ``<name>`` with dashes, and one
line ``<name> = "method_configs.<module>:<attribute>"`` under
``[project.entry-points."nerfstudio.method_configs"]`` in ``pyproject.toml``; then
``pip install -e .`` refreshes the installed entry points. ``tests/test_registry.py``
checks every registered method. The guidance edits (``pds-edit``, ``pds-splatfacto``, ...)
are generated instead, one per scene representation and edit guidance method, from the
tables of ``method_configs/_edit.py`` into ``method_configs/guided_edits.py``; each still
needs its entry-point line (``tests/test_edit_splatfacto.py`` checks they match).
"""

from nerfstudio_distill import compat

compat.install()
