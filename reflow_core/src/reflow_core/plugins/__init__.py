"""Observer plugins that ship with Reflow, built on the lifecycle hooks of
:class:`reflow_core.hookspecs.LifecycleSpecs`.

* :class:`reflow_core.plugins.logging.LoggingPlugin`: one structured record
  per lifecycle event on a standard :mod:`logging` logger.
"""
