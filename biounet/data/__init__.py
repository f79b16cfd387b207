"""Reading images, labels and datasets in every layout, normalization, augmentation, the batch loader,
fetching data. Imports only core."""
