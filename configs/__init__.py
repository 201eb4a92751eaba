"""Configuration presets shipped with ibau (installed as ``ibau_cli.configs``)."""
