"""Tuna et al. (2021), "Exploiting epistemic uncertainty of the deep learning models to generate
adversarial samples" / uncertainty + closeness detection, reproduced on scikit-learn's digits."""
