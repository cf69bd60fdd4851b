"""`supermix` console script. The chat/serve commands arrive with the runtime issue."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supermix")
def main() -> None:
    """Supermix runtime: chat with a trained model locally.

    The terminal chat (`supermix chat`), one-shot answers (`supermix ask`) and the web/API server
    (`supermix serve`) are being built; see the project README for the current state.
    """


if __name__ == "__main__":
    main()
