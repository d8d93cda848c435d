from explainguide.app import main

main()
