# The project's container images, built with podman from local base images (see images/build.sh
# and images/README.md). A second run reuses podman's layer cache and takes seconds.

.PHONY: images
images: ## build every image in images/ with podman (docker.io/modelfleet/<name>:<appVersion>)
	@bash images/build.sh
