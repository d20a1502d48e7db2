"""The processes of an emulated host: CPU workers, devices and traffic ports."""
