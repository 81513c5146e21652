"""Format detection and normalization (TEMPORARY placeholder: the formats helper replaces this)."""


def read_lora(source, *, weight_name=None, allow_pickle=False, component=None):
    raise NotImplementedError


def write_adapter(adapter, path, format):
    raise NotImplementedError


def save_lora_weights(*args, **kwargs):
    raise NotImplementedError
