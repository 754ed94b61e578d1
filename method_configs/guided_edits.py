"""ns-train pds-edit, dds-edit, sds-edit (nerfacto) and pds-splatfacto, dds-splatfacto, sds-splatfacto
(Gaussian splats): the guidance edits, one per scene representation and guidance method, built from the
tables of :mod:`method_configs._edit`. Each is a module attribute named like the method with underscores
(``pds_splatfacto``), which its entry point in pyproject.toml names."""

from method_configs._edit import guided_edits

METHODS = guided_edits()
"""The guidance edits, by method name."""

globals().update({name.replace("-", "_"): spec for name, spec in METHODS.items()})
