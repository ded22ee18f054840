package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdReload(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal reload: not implemented yet")
	return 1
}
