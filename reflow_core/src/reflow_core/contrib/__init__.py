"""Integrations with web frameworks: :mod:`reflow_core.contrib.fastapi`
(and Starlette), :mod:`reflow_core.contrib.django` and
:mod:`reflow_core.contrib.flask`. Each imports its framework, which
``reflow-core`` does not depend on: install it (or the extra of the same
name, ``reflow-core[django]``)."""
