"""Config bodies (JSON) per variant and size, installed as the `dlm_hub_configs` package for `dlm train --size`."""
