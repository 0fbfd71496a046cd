"""The `starcoder-jax` command line (`starcoder_jax.cli.main`), one module per subcommand."""
