"""The `hf-based` console script. While this module is loaded, `import hf_based` leaves registering the model type
with transformers (which imports torch) to `hf_based.cli.main`, after the arguments are parsed: `--help` and usage
errors then answer at once."""


def main() -> int:
    from hf_based.cli import main as run_command

    return run_command()
