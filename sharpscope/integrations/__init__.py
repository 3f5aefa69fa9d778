"""Optional integrations with training frameworks (transformers, Lightning): each module imports
its framework, so none is imported by ``import sharpscope``."""
