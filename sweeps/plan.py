"""Import shim, for one release: Tune experiments recorded before `sweeps/` was split into layers
pickled stages by this module's path. Use `sweeps.core.plan`."""

from sweeps.core.plan import Role, Stage  # noqa: F401
