def launch(*a, **k):
    raise NotImplementedError
