# Shortcuts for the two commands in the README.
.PHONY: demo test install
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
install:
	./scripts/install.sh
