"""The single controller and the `unmask` command line."""
