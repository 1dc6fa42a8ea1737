"""Walking a jaxpr for structural tests: what a program computes, not only its values."""

import jax


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scans, jits, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_eqns(sub)
