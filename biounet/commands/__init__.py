"""The command-line programs (console scripts and the design card's scripts): flags in, the library's
work out. Nothing of the library imports them."""
