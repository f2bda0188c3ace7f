// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.widget;

import android.content.Context;
import android.view.ViewGroup;

public class FrameLayout extends ViewGroup {
    public FrameLayout(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }
}
