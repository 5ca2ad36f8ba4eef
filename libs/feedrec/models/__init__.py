"""TorchRec models: the served modules and the ``...Train`` wrappers that own the losses."""
