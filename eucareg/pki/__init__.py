"""Keys, the cloud CA, certificates, bundles and signatures."""
