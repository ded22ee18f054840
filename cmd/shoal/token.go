package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdToken(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal token: not implemented yet")
	return 1
}
