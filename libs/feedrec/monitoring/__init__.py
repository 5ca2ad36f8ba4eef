"""Operations: drift of the feature and prediction distributions between training and now."""
