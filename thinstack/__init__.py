"""thinstack: VM disk storage on Linux device-mapper thin pools."""

__version__ = "0.1.0"
